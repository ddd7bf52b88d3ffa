"""What every framework path needs around the engine it builds, whatever the framework.

Frameworks build a model's optimizer first and change what it holds afterwards: DeepSpeed
replaces the parameters in the client optimizer's groups with flat partitions, Accelerate and
HF Trainer under FSDP2 replace them with the DTensors ``fully_shard`` made. The distributor
follows the parameters by itself (`snr_dist.optim.engine`); what it cannot do alone is find
the DeepSpeed optimizer it must read partitions from, or the FSDP2 model whose unsharded
parameters carry each rank's own gradient. The integrations (`snr_dist.deepspeed`,
`snr_dist.integrations.accelerate`, `.transformers`, `.lightning`) call these functions at the
point where the framework has built those, before the first step and before a checkpoint is
loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from snr_dist.distributors.dtensor import is_dtensor
from snr_dist.integrations.wrappers import unwrap
from snr_dist.optim.base import SNROptimizerMixin
from snr_dist.optim.snr_adamw import SNRAdamW


def needs_rows(opt: SNROptimizerMixin) -> bool:
    """Subspace mode or the cross-sample estimator in any param group: under DeepSpeed ZeRO
    1-3 and its bf16 optimizer such an optimizer runs on row shards."""
    return any(
        g["mode"] == "subspace" or g["estimator"] == "cross_sample" for g in opt.param_groups
    )


@contextlib.contextmanager
def deferred_steps(opts: Iterable[Any]) -> Iterator[None]:
    """No SNRAdamW step while DeepSpeed builds its engine: its unfused bf16/fp16 optimizer
    (ZeRO stage 0) "initialises optimizer states" with a step on zero gradients, which would
    decay the weights and advance the bias corrections."""
    held = [o for o in opts if isinstance(o, SNRAdamW)]
    for opt in held:
        opt._defer_steps = True
    try:
        yield
    finally:
        for opt in held:
            opt._defer_steps = False


def attach_deepspeed(ds_optimizer: Any) -> SNROptimizerMixin | None:
    """After DeepSpeed has built its optimizer around an SNRAdamW (``ds_optimizer``: what
    ``deepspeed.initialize`` returned, or a framework's wrapper of it): run the SNRAdamW on
    row shards of ZeRO's partitions when it needs whole rows. A no-op when DeepSpeed kept
    the model's own parameters (ZeRO stage 0 in fp32), for the elementwise mode, and when
    already attached. Returns the SNR optimizer (None if there is none). Call it on every
    rank, before the first step and before a checkpoint is loaded."""
    client = unwrap(ds_optimizer)
    if client is None:
        return None
    wrapper = _deepspeed_holder(ds_optimizer, client)
    if wrapper is None:
        return client  # ZeRO stage 0 in fp32: DeepSpeed steps the client optimizer itself
    if client.zero_view is not None or not needs_rows(client):
        return client
    if not isinstance(client, SNRAdamW):
        raise TypeError(
            "snr-dist runs subspace mode and the cross-sample estimator on DeepSpeed's "
            "partitions for SNRAdamW only; SNRPreconditioner wraps another optimizer and is not "
            "supported as DeepSpeed's client optimizer there"
        )
    client.attach_zero(wrapper, getattr(wrapper, "dp_process_group", None))
    return client


def adopt_fsdp2(model: Any, optimizer: Any) -> SNROptimizerMixin | None:
    """After a framework sharded ``model`` with FSDP2 and put the DTensors in the groups of
    ``optimizer`` (built on the plain parameters before, as Accelerate and HF Trainer do):
    the sharded distributor now, and the cross-sample estimator's hooks on FSDP2's unsharded
    parameters (`SNROptimizerMixin.attach_fsdp`). Returns the SNR optimizer (None if there is
    none)."""
    opt = unwrap(optimizer)
    if opt is None:
        return None
    params = [p for g in opt.param_groups for p in g["params"]]
    if not any(is_dtensor(p) for p in params):
        return opt
    opt.sync_param_groups()  # the distributor for DTensors, tracker owners, hooks
    if any(g["estimator"] == "cross_sample" for g in opt.param_groups):
        opt.attach_fsdp(model)
    return opt


def _deepspeed_holder(optimizer: Any, client: Any) -> Any:
    """The DeepSpeed optimizer whose client ``client`` is (ZeRO's, or the bf16/fp16 one),
    found behind framework wrappers (accelerate's ``DeepSpeedOptimizerWrapper``); None when
    DeepSpeed uses the client as it is."""
    seen: set[int] = set()
    obj = optimizer
    while obj is not None and obj is not client and id(obj) not in seen:
        seen.add(id(obj))
        inner = getattr(obj, "optimizer", None)
        if inner is client and type(obj).__module__.startswith("deepspeed."):
            return obj
        obj = inner
    return None
