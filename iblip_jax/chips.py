"""TPU chips' published figures (bf16 peak, HBM, ICI links): what the AOT tool sizes slices with and what training
divides its model FLOP/s by for MFU."""
import dataclasses

GiB = 2**30

@dataclasses.dataclass(frozen=True)
class Chip:
  name: str              # what users type: v5e, v4, v5p
  libtpu_name: str       # the generation as libtpu's topology names spell it ("v5" is v5p)
  chip_config: str       # "megacore": v4/v5p's two TensorCores act as one device, as on Cloud TPU VMs
  hbm_bytes: int         # published HBM per chip
  peak_flops: float      # published dense bf16 FLOP/s per chip
  dims: int              # 2-D (v5e torus) or 3-D (v4/v5p) topology
  hbm_bandwidth: float = 0.0   # published HBM bandwidth per chip, bytes/s
  ici_link_bandwidth: float = 0.0   # one ICI link, one direction, bytes/s
  ici_ports: int = 0     # ICI links per chip (2 per torus dimension)
  source: str = ""       # where the figures come from


# Published figures (Cloud TPU system-architecture pages, read 2026; /work/shared/reference/jax_anchors.md section 10):
# - v5e (docs.cloud.google.com/tpu/docs/v5e): 197 TFLOP/s bf16, 16 GB HBM at 819 GB/s, ICI 400 GB/s per chip
#   bidirectional over 4 ports (the older table says 1,600 Gbps = 200 GB/s each way): 50 GB/s per link each way.
# - v4 (docs.cloud.google.com/tpu/docs/v4): 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s. The page gives no per-chip
#   ICI figure; the TPU v4 paper (Jouppi et al., ISCA 2023, arXiv:2304.01433) gives 6 ICI links per chip at 400 Gbit/s
#   = 50 GB/s each way.
# - v5p (docs.cloud.google.com/tpu/docs/v5p-training): 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s, ICI 1,200 GB/s per
#   chip bidirectional (4,800 Gbps each way) over 6 ports (3-D torus): 100 GB/s per link each way.
CHIPS = {
    "v5e": Chip("v5e", "v5e", "default", 16 * GiB, 197e12, 2, hbm_bandwidth=819e9, ici_link_bandwidth=50e9,
                ici_ports=4, source="Cloud TPU v5e page: 197 TFLOP/s bf16, 819 GB/s HBM, ICI 400 GB/s bidirectional "
                "per chip over 4 ports"),
    "v4": Chip("v4", "v4", "megacore", 32 * GiB, 275e12, 3, hbm_bandwidth=1200e9, ici_link_bandwidth=50e9,
               ici_ports=6, source="Cloud TPU v4 page: 275 TFLOP/s bf16, 1,200 GB/s HBM; TPU v4 paper (ISCA 2023): "
               "6 ICI links at 50 GB/s each way"),
    "v5p": Chip("v5p", "v5", "megacore", 95 * GiB, 459e12, 3, hbm_bandwidth=2765e9, ici_link_bandwidth=100e9,
                ici_ports=6, source="Cloud TPU v5p page: 459 TFLOP/s bf16, 2,765 GB/s HBM, ICI 1,200 GB/s "
                "bidirectional per chip over 6 ports"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}

# jax's device_kind of each generation's chips (TPU VMs report these; "TPU v5" is v5p)
DEVICE_KINDS = {"TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v4": "v4", "TPU v5p": "v5p", "TPU v5": "v5p"}


def peak_flops(device_kind: str) -> float | None:
  """The published dense bf16 FLOP/s of one chip of `device_kind` (jax.devices()[0].device_kind), None if unknown
  (CPUs, GPUs, other TPUs: config.peak_tflops gives it)."""
  name = DEVICE_KINDS.get(device_kind)
  return CHIPS[name].peak_flops if name else None
