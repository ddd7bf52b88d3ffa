"""SNRPreconditioner: the SNR gate on top of *any* torch optimizer (SGD, Adam, Lion, ...).

The base optimizer computes its update as usual; the wrapper measures it (parameters after minus
before) and scales it by the gates. The SNR statistics are the wrapper's own (it cannot assume
the base keeps a second moment), so the temporal estimator costs two state vectors here,
versus one in `snr_dist.optim.snr_adamw.SNRAdamW`.

The wrapper gates the base's *whole* update, including any weight decay the base applies. For
ungated decoupled decay, use SNRAdamW, or set the base's ``weight_decay=0`` and decay yourself.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from snr_dist.distributors.dtensor import local
from snr_dist.estimators import Moments, complement_closed, gate_active
from snr_dist.layout import Kind
from snr_dist.optim.base import (
    SNROptimizerMixin,
    advance_steps,
    param_states,
    run_hooks,
    split_tensors,
    step_tensor,
)
from snr_dist.options import SNROptions, complete_saved_group

_ADAM_KEYS = ("betas", "eps", "weight_decay", "amsgrad")


def _article_base(params: Any, lr: float | None, options: dict[str, Any]) -> torch.optim.Adam:
    """The base optimizer of the article's constructor form: Adam over ``params``."""
    if isinstance(params, torch.nn.Module):
        raise TypeError(
            f"SNRPreconditioner got a module ({type(params).__name__}); pass its parameters: "
            "SNRPreconditioner(model.parameters(), lr=1e-3, snr_threshold=0.5, rank=128), or "
            "wrap an optimizer: SNRPreconditioner(torch.optim.SGD(model.parameters(), lr=0.1))"
        )
    if isinstance(params, Tensor) or not isinstance(params, Iterable) or isinstance(params, str):
        raise TypeError(
            "SNRPreconditioner takes a torch.optim.Optimizer to wrap, or the parameters (an "
            "iterable of tensors or of param-group dicts) to build Adam over; got "
            f"{type(params).__name__}. E.g. SNRPreconditioner(model.parameters(), lr=1e-3, "
            "snr_threshold=0.5, rank=128)"
        )
    adam = {k: options.pop(k) for k in _ADAM_KEYS if k in options}
    return torch.optim.Adam(params, lr=1e-3 if lr is None else lr, **adam)


#: The torch optimizers SNRPreconditioner is tested around (tests/test_optimizer_contract.py).
_SUPPORTED = (
    "SGD (with or without momentum, Nesterov), Adam, AdamW, NAdam, RAdam, Adamax, Adagrad, "
    "Adadelta, RMSprop, ASGD, Rprop, Adafactor, Muon (weight matrices only, as Muon itself)"
)
#: The torch optimizers it refuses, and why.
_REFUSED = {
    torch.optim.LBFGS: "it re-evaluates the closure inside its step, so a single gradient (and "
    "SNR) per step does not exist",
    torch.optim.SparseAdam: "it steps on sparse gradients only, and the SNR statistics are "
    "dense (the wrapper refuses sparse gradients); use Adam with dense gradients",
}


def _is_index(key: Any) -> bool:
    """A saved SNR state's key that names a parameter (its position, possibly as text)."""
    if isinstance(key, bool):
        return False
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


class SNRPreconditioner(SNROptimizerMixin, torch.optim.Optimizer):
    """Gate the updates of ``base_optimizer`` by their signal-to-noise ratio.

    The SNR options (``snr=`` an `snr_dist.options.SNROptions`, or keywords; here also
    ``snr_beta2``, the EMA factor of the squared gradient) become defaults of every base param
    group; keys already present in a base group (e.g.
    ``SGD([{"params": w, "mode": "subspace"}])``) win. ``param_groups`` is the base optimizer's
    list, so LR schedulers act on the base directly. The state_dict holds the base's state_dict
    and the SNR statistics. ``process_group``, ``flush_denormals``: see
    `snr_dist.optim.snr_adamw.SNRAdamW`; the flush covers the base's step too, and applies only
    when every base group has an ``eps`` of at least 1e-12 (Adam, AdamW, RMSprop; not SGD).

    The article's form, ``SNRPreconditioner(model.parameters(), lr=1e-3, snr_threshold=0.5,
    rank=128)``, builds the equivalent optimizer: `torch.optim.Adam` over the parameters (``lr``,
    and ``betas``, ``eps``, ``weight_decay`` if given) as the base, its rule
    ``min(1, SNR / snr_threshold)`` as the ``clamp`` gate with ``tau = snr_threshold``, and
    ``rank`` as the rank of subspace mode (the article's low-rank eigenspace; ``mode`` defaults
    to "subspace" there). ``snr_threshold`` is accepted with a base optimizer too.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        *,
        snr_threshold: float | None = None,
        snr: SNROptions | Mapping[str, Any] | None = None,
        foreach: bool = True,
        skip_nonfinite: bool = True,
        flush_denormals: bool = True,
        process_group="auto",
        **snr_options: Any,
    ) -> None:
        for k in snr_options:
            if k not in SNROptions.model_fields and difflib.get_close_matches(
                k, ["snr_threshold"], 1
            ):
                raise TypeError(
                    f"SNRPreconditioner got an unknown keyword {k!r}; did you mean "
                    "snr_threshold (the article's min(1, SNR / snr_threshold) rule)?"
                )
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            base_optimizer = _article_base(base_optimizer, lr, snr_options)
            snr_options.setdefault("mode", "subspace")
            snr_options.setdefault("rank", 128)
            if snr_threshold is None:
                snr_threshold = 0.5
        elif lr is not None:
            raise TypeError(
                f"SNRPreconditioner(optimizer, lr={lr!r}): the learning rate belongs to the base "
                f"optimizer ({type(base_optimizer).__name__}(params, lr=...)); or pass the "
                "parameters instead, SNRPreconditioner(model.parameters(), lr=...), to get Adam "
                "as the base"
            )
        if snr_threshold is not None:
            clash = sorted({"gate", "tau"} & (set(snr_options) | set(snr or {})))
            if clash:
                raise ValueError(
                    f"snr_threshold={snr_threshold!r} means gate='clamp', tau={snr_threshold!r}; "
                    f"it cannot be combined with {', '.join(clash)}: pass one or the other"
                )
            snr_options.update(gate="clamp", tau=snr_threshold)
        for cls, why in _REFUSED.items():
            if isinstance(base_optimizer, cls):
                raise TypeError(
                    f"SNRPreconditioner cannot wrap {cls.__name__}: {why}. It wraps first-order "
                    f"optimizers that step on dense gradients: {_SUPPORTED} (docs/options.md)"
                )
        options = SNROptions.parse(snr, **snr_options).model_dump()
        self.base = base_optimizer
        self.foreach = foreach
        self.skip_nonfinite = skip_nonfinite
        self.flush_denormals = bool(flush_denormals)
        self.process_group = process_group
        self._snr_defaults = options
        for group in base_optimizer.param_groups:
            self._validate(self._with_defaults(group))
        for group in base_optimizer.param_groups:
            group.update(self._with_defaults(group))
        super().__init__(base_optimizer.param_groups, {**base_optimizer.defaults, **options})
        self.param_groups = base_optimizer.param_groups  # one list, shared with the base
        self._start_engine()

    @staticmethod
    def _moments() -> Moments:
        return Moments(adam=False)

    def _with_defaults(self, group: dict) -> dict:
        return {**self._snr_defaults, **group}

    @staticmethod
    def _validate(group: dict) -> None:
        SNROptions.parse({k: group[k] for k in SNROptions.model_fields if k in group})
        if group.get("state_dtype", "float32") != "float32":
            raise ValueError(
                f"Invalid state_dtype: {group['state_dtype']!r}; allowed in SNRPreconditioner: "
                "'float32' (the base optimizer owns its state; state_dtype='bfloat16' is "
                "SNRAdamW's: its first moment and SNR statistics in bfloat16)"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group, then add it to the base optimizer (and so to this one)."""
        if not hasattr(self, "_engine"):  # Optimizer.__init__ re-adding the base's groups
            super().add_param_group(param_group)
            return
        param_group = dict(param_group)
        params = param_group.get("params")
        if isinstance(params, Tensor):
            param_group["params"] = [params]
        elif params is not None and not isinstance(params, set):
            param_group["params"] = list(params)
        candidate = {**self.base.defaults, **self._with_defaults(param_group)}
        self._validate(candidate)
        self._engine.check_group(candidate)
        self.base.add_param_group(param_group)
        self.base.param_groups[-1].update(self._with_defaults(self.base.param_groups[-1]))
        self._engine.sync_groups()

    def __repr__(self) -> str:
        return f"SNRPreconditioner({self.base!r})"

    # ------------------------------------------------------------------ state
    def _kinds(self, p: Tensor, state: Mapping) -> dict[str, Kind]:
        kinds = {"step": Kind.SHARED} if "step" in state else {}
        return {**kinds, **self._engine.state_kinds(p, self._engine.group_of(p), state)}

    def state_dict(self) -> dict[str, Any]:
        """``{"base": base.state_dict(), "snr": {"state": {param index: SNR state}}}``,
        complete on every rank (under FSDP2 with trackers, whose statistics are partial sums
        over the ranks, it sums them: every rank calls it then, as FSDP2 save paths do).
        Hooks registered with ``register_state_dict_pre_hook`` / ``_post_hook`` run as in
        torch's."""
        run_hooks(self._optimizer_state_dict_pre_hooks, self)
        dist = self._engine.distributor
        items = [(p, st, self._kinds(p, st)) for p, st in param_states(self.state)]
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        values = dist.global_state(items)
        snr_state = {
            index[p]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in vals.items()}
            for (p, _, _), vals in zip(items, values)
        }
        # entries under other keys than parameters, as torch's optimizers save them
        snr_state.update((k, v) for k, v in self.state.items() if not isinstance(k, Tensor))
        state_dict = {"base": self.base.state_dict(), "snr": {"state": snr_state}}
        return run_hooks(self._optimizer_state_dict_post_hooks, self, state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what `state_dict` wrote (the base's state and groups, then the SNR state);
        load hooks run as in torch's."""
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # shallow, as torch's: a pre-hook may edit it
        state_dict = run_hooks(self._optimizer_load_state_dict_pre_hooks, self, state_dict)
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"base", "snr"}:
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict)
            raise ValueError(
                f"not an SNRPreconditioner state_dict: expected keys 'base' and 'snr', got {got}"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        snr_state = state_dict["snr"]["state"]
        others = {k: v for k, v in snr_state.items() if not _is_index(k)}  # kept as they are
        snr_state = {k: v for k, v in snr_state.items() if _is_index(k)}
        bad = [i for i in snr_state if not 0 <= int(i) < len(params)]
        if bad:
            raise ValueError(f"SNR state refers to parameter indices {bad} that do not exist")
        base = state_dict["base"]
        # SNR options an earlier release's groups predate, as that release ran them
        groups = [complete_saved_group(g, self._snr_defaults) for g in base["param_groups"]]
        self.base.load_state_dict({**base, "param_groups": groups})
        self.param_groups = self.base.param_groups
        self._engine.index()
        dist = self._engine.distributor
        self.state = defaultdict(dict, others)
        for i, st in snr_state.items():
            p = params[int(i)]
            st = {k: (step_tensor(v) if k == "step" else v) for k, v in st.items()}
            tensors, _ = split_tensors(st)  # other entries (a user's, torch allows) as they are
            installed = dist.install_state(p, tensors, self._kinds(p, st))
            device = local(p).device
            self.state[p] = {
                k: v if k == "step" or k not in installed else installed[k].to(device).clone()
                for k, v in st.items()
            }
        self._engine.sync_groups()
        run_hooks(self._optimizer_load_state_dict_post_hooks, self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(base=self.base, foreach=self.foreach, _snr_defaults=self._snr_defaults)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.base = state.pop("base")
        self.foreach = state.pop("foreach", True)
        self._snr_defaults = state.pop("_snr_defaults", {})
        state["param_groups"] = self.base.param_groups
        super().__setstate__(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base's zero_grad; also forgets micro-batch gradients recorded since the last step."""
        self.base.zero_grad(set_to_none=set_to_none)
        self._engine.capture.discard()
        self._engine.capture.wake()  # parameters unfrozen since: observed from this backward

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Record statistics, let the base step, then gate what it changed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._step_flush():
            self._step()
        return loss

    def _base_step(self) -> None:
        """The base optimizer's step inside this one's: its own step hooks run (those
        registered on ``opt.base``, and an LR scheduler's mark when one is attached to the
        base), torch's global step hooks do not: they ran for this step already, once.

        torch wraps each optimizer class's ``step`` (``Optimizer.profile_hook_step``) to run
        the global hooks, then the instance's, around the class's own function; this runs
        that function with the instance's hooks only."""
        base = self.base
        wrapped = type(base).step
        inner = getattr(wrapped, "__wrapped__", None) if getattr(wrapped, "hooked", False) else None
        patched = vars(base).get("step")  # an instance-level wrapper of the step
        if inner is None or (
            patched is not None and not getattr(patched, "_wrapped_by_lr_sched", False)
        ):
            base.step()  # not torch's wrapper, or something else wraps it: its step as it is
            return
        if patched is not None:
            base._opt_called = True  # what the scheduler's wrapper records (torch's name)
        args: tuple = (base,)
        kwargs: dict = {}
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(base).__name__}.step"):
            for hook in list(base._optimizer_step_pre_hooks.values()):
                result = hook(base, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"a step pre-hook of {type(base).__name__} must return None or a "
                            f"tuple of (new_args, new_kwargs), but got {result}"
                        )
                    args, kwargs = result
            inner(*args, **kwargs)
            base._optimizer_step_code()
            for hook in list(base._optimizer_step_post_hooks.values()):
                hook(base, args, kwargs)

    def _adopt_base_groups(self) -> None:
        """Groups added to the base directly (``opt.base.add_param_group``) share its list but
        lack the SNR options: they get this optimizer's defaults, as `add_param_group` gives."""
        bare = [g for g in self.base.param_groups if "estimator" not in g]
        if not bare:
            return
        for group in bare:
            candidate = {**self.base.defaults, **self._with_defaults(group)}
            self._validate(candidate)
            self._engine.check_group(candidate)
            group.update(self._with_defaults(group))
        self._engine.sync_groups()

    def _step(self) -> None:
        engine = self._engine
        self._adopt_base_groups()
        engine.begin_step()
        hidden: list[tuple[Tensor, Tensor]] = []  # non-finite grads hidden from the base
        try:
            collected = []
            for group in self.param_groups:
                params, grads, skipped = engine.gradients(
                    group, self.skip_nonfinite, "SNRPreconditioner"
                )
                for p in skipped:
                    hidden.append((p, p.grad))
                    p.grad = None
                engine.check_ready(group, params)
                collected.append((group, params, grads))
            engine.capture.discard([p for p, _ in hidden])
            work = []
            for group, params, grads in collected:
                if not params:
                    continue
                for p in params:
                    st = self.state[p]
                    if "step" not in st:
                        st["step"] = torch.zeros((), dtype=torch.float32)
                        engine.init_state(p, group, st)
                steps = advance_steps([self.state[p] for p in params])
                grads32 = [g if g.dtype == torch.float32 else g.float() for g in grads]
                by_est = engine.slots(group, params, grads32, steps)
                engine.update(group, by_est)
                work.append((group, by_est))
            engine.exchange(work)
            snapshots = []
            for group, by_est in work:
                slots = [s for ss in by_est.values() for s in ss]
                active = complement_closed(group) or any(gate_active(group, s.step) for s in slots)
                before = (
                    torch._foreach_mul([local(s.param) for s in slots], 1.0) if active else None
                )
                snapshots.append((slots, before))
            self._base_step()
        finally:
            for p, g in hidden:
                p.grad = g
        for (group, _), (slots, before) in zip(work, snapshots):
            if before is None:
                continue
            now = [local(s.param) for s in slots]
            delta = [d.float() for d in torch._foreach_sub(now, before)]
            engine.gate_(group, slots, delta, foreach=self.foreach)
            torch._foreach_add_(before, [d.to(b.dtype) for d, b in zip(delta, before)])
            torch._foreach_copy_(now, before)
        engine.refresh(work)
        engine.capture.wake()
