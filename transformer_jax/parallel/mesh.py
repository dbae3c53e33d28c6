"""Device meshes `data x fsdp x tensor` and the rules that map logical axis names
(`transformer_jax.partitioning`) onto them.

  data    batch split across replicas; parameters replicated
  fsdp    batch split as for `data`, and every weight matrix (with its Adam
          moments) sharded along d_model: ZeRO-3 / FSDP (Rajbhandari et al. 2020,
          arXiv 1910.02054)
  tensor  attention heads and the MLP hidden width split across devices
          (Megatron-LM, Shoeybi et al. 2019, arXiv 1909.08053)

`MeshConfig.parse("data=2,fsdp=2,tensor=2")` reads the command-line form;
`validate` names what does not fit (device count, heads, widths, batch) before
anything is compiled.
"""
from __future__ import annotations

import dataclasses
import math

import jax

from transformer_jax import partitioning as logical

# `transformer-jax train --parallel`; "auto" (the default) resolves to "shard" over
# every device when there are several and the batch splits evenly, else "none".
PARALLEL_MODES = ("auto", "none", "pmap", "shard")
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # mesh axes the batch dimension is split over

# Logical name -> mesh axis (or axes, or None = replicated). Flax picks the first
# rule whose mesh axes are still free in that array, so each mesh axis is used once.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (logical.BATCH, BATCH_AXES),
    (logical.LENGTH, None),
    (logical.ACT_EMBED, None),
    (logical.ACT_HEADS, "tensor"),
    (logical.ACT_KV, None),
    (logical.ACT_MLP, "tensor"),
    (logical.EMBED, "fsdp"),
    (logical.HEADS, "tensor"),
    (logical.KV, None),
    (logical.MLP, "tensor"),
    # Vocabularies (30522, 50257) rarely divide a device count; the table is
    # still sharded over fsdp along its embed axis.
    (logical.VOCAB, None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the three mesh axes (their product is the device count) and the
    logical-to-mesh rules. A global batch `[B, ...]` is split over data x fsdp
    (`[B / (data * fsdp), ...]` per device); a kernel `[d_model, d_ff]` is held as
    `[d_model / fsdp, d_ff / tensor]` per device."""
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple = LOGICAL_RULES

    def __post_init__(self):
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"mesh axis {axis}={size!r} must be a positive integer")

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """"data=2,fsdp=2,tensor=2" -> MeshConfig; omitted axes have size 1."""
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in MESH_AXES:
                raise ValueError(f"mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS one of "
                                 f"{', '.join(MESH_AXES)} (e.g. 'data=2,fsdp=2,tensor=2')")
            if name in sizes:
                raise ValueError(f"mesh {text!r}: axis {name!r} is given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"mesh {text!r}: size of {name!r} is {value.strip()!r}, "
                                 "not an integer") from None
        if not sizes:
            raise ValueError(f"mesh {text!r} names no axis; e.g. 'data=8' or 'data=2,fsdp=2,tensor=2'")
        return cls(**sizes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(data, fsdp, tensor): the mesh's device array shape."""
        return (self.data, self.fsdp, self.tensor)

    @property
    def size(self) -> int:
        """Number of devices: data * fsdp * tensor."""
        return math.prod(self.shape)

    @property
    def batch_shards(self) -> int:
        """Into how many slices the global batch `[B, ...]` is split: data * fsdp."""
        return self.data * self.fsdp

    def __str__(self) -> str:
        return ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, self.shape))

    def validate(self, num_devices: int, config=None, batch_size: int | None = None) -> None:
        """ValueError naming the first thing that does not fit: the device count, the
        model's heads / widths (`config`, a TransformerConfig) or the global batch."""
        if self.size != num_devices:
            raise ValueError(f"mesh {self} has {self.size} devices "
                             f"({' x '.join(map(str, self.shape))}) but {num_devices} are "
                             "available; the product of the axis sizes must equal the device count")
        if config is not None:
            kv_heads = config.num_kv_heads or config.num_heads
            for field, value, axis in (("num_heads", config.num_heads, "tensor"),
                                       ("num_kv_heads", kv_heads, "tensor"),
                                       ("d_ff", config.d_ff, "tensor"),
                                       ("d_model", config.d_model, "fsdp")):
                size = getattr(self, axis)
                if value % size:
                    raise ValueError(f"{field}={value} is not divisible by mesh axis {axis}={size}; "
                                     f"choose {axis} among the divisors of {value}")
        if batch_size is not None and batch_size % self.batch_shards:
            raise ValueError(f"batch_size={batch_size} is not divisible by data x fsdp = "
                             f"{self.data} x {self.fsdp} = {self.batch_shards}")

    def make_mesh(self, devices=None) -> jax.sharding.Mesh:
        """A Mesh over `devices` (default: all, across processes) with axes data, fsdp,
        tensor: its device array is `[data, fsdp, tensor]`. Axis types are Auto: the
        compiler propagates shardings from the annotated parameters and constraints
        (the GSPMD style these rules are for)."""
        devices = jax.devices() if devices is None else list(devices)
        self.validate(len(devices))
        auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
        return jax.make_mesh(self.shape, MESH_AXES, axis_types=auto, devices=devices)

