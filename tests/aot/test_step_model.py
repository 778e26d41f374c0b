"""The step model and the report: fits, the three terms and the largest, the printed text."""
import dataclasses

import pytest

from iblip_jax.aot import hlo, step_model, topology


def test_fits_and_report_text():
  report = step_model.Report("train step", argument_bytes=3 << 30, output_bytes=1 << 30, alias_bytes=1 << 30,
                             temp_bytes=10 << 30, code_bytes=0, compile_seconds=1.0, flops=4 * 197e12,
                             model_flops=2 * 197e12, flops_note="test")
  slice_ = topology.parse_topology("v5e:2x2")
  assert report.total_bytes == 13 << 30          # the donated (aliased) output is not counted twice
  assert step_model.fits(report, slice_)
  text = step_model.format_report(report, slice_)
  assert "total 13.000 GiB of 16 GiB HBM per v5e chip" in text and "fits" in text
  assert "FLOPs per call: 788 TFLOP executed (197 TFLOP per chip if evenly split), 394 TFLOP without remat" in text
  assert "(197 TFLOP/s per chip): at least 1 s, MFU 50%; at 50% of peak 2 s, MFU 25%" in text
  small = dataclasses.replace(slice_, chip=dataclasses.replace(slice_.chip, hbm_bytes=12 << 30))
  assert not step_model.fits(report, small)
  assert "DOES NOT FIT" in step_model.format_report(report, small)


def _report_with_traffic(ici_seconds, hbm_bytes):
  comm = step_model.Communication({k: dict(ops=1, runs=1, bytes=ici_seconds * 100e9 if k == "all-gather" else 0.0,
                                           seconds=ici_seconds if k == "all-gather" else 0.0) for k in hlo.KIND_ORDER},
                                  {"LLM": ici_seconds}, [])
  return step_model.Report("train step", 1 << 30, 1 << 20, 1 << 20, 2 << 30, 0, 1.0, flops=16 * 197e12 * 0.25,
                           model_flops=16 * 197e12 * 0.2, flops_note="test", batch=64, remat_policy="full",
                           communication=comm, hbm_bytes=hbm_bytes, hbm_bytes_once=hbm_bytes,
                           xla_bytes_accessed=hbm_bytes)


@pytest.mark.parametrize("ici_seconds, hbm_bytes, bound", [(0.1, 100e9, "compute"), (2.0, 100e9, "ICI"),
                                                           (0.1, 819e9, "HBM")])
def test_step_estimate_is_the_largest_term(ici_seconds, hbm_bytes, bound):
  slice_ = topology.parse_topology("v5e:4x4")
  report = _report_with_traffic(ici_seconds, hbm_bytes)
  est = step_model.step_estimate(report, slice_, mfu=0.5)
  assert est.compute_seconds == pytest.approx(0.5)   # 0.25 s of FLOPs per chip at peak, at 50% utilisation
  assert est.ici_seconds == ici_seconds and est.hbm_seconds == pytest.approx(hbm_bytes / 819e9)
  assert est.seconds == max(est.compute_seconds, est.ici_seconds, est.hbm_seconds) and est.bound == bound
  assert est.serial == pytest.approx(est.compute_seconds + est.ici_seconds + est.hbm_seconds)
  text = step_model.format_report(report, slice_, mfu=0.5)
  assert "executed / model FLOPs: 1.250 (remat policy full)" in text
  assert f"estimated step: {step_model._time_text(est.seconds)} ({bound}-bound" in text
  assert "Cloud TPU v5e page" in text and "MaxText reports" in text and "50 GB/s per link" in text
  assert f"{64 / est.seconds / 16:.3g} images/s per chip" in text
