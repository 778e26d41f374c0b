"""Ahead-of-time compilation for TPU slices on a host without TPUs, and a model of the step's time there
(tools/aot_compile.py is the command line):
  topology    chips and slices, their compile-only devices, mesh presets
  compile     the train step and generation compiled from shapes, memory and FLOPs
  hlo         the compiled program read back: loops, collectives, HBM bytes
  step_model  compute, ICI and HBM terms of a step, and the printed report
"""
