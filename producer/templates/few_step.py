"""A template's few-step sampling and fast path: checked at load, carried in the job's options.

In a template (or in ``defaults``)::

    sampling: lightning      # lcm, tcd, lightning, hyper_sd or turbo; or a mapping:
    sampling: {method: tcd, eta: 0.5}     # eta: TCD's gamma (tcd; hyper_sd with scheduler tcd)
    loras:                   # a distilled LoRA loads as any LoRA does
      - {path: loras/sdxl_lightning_4step_lora.safetensors}
    fast_path:               # each optional; the workers' settings decide what is left out
      channels_last: true
      fuse_qkv: true
      compile: max-autotune-no-cudagraphs   # or off, default, reduce-overhead, max-autotune
      fp8: true              # Hopper GPUs with torchao only; approximate
      deepcache: 3           # reuse the UNet's deep features 2 steps in 3; approximate

Each few-step method has its sampler, step range and guidance (pixelmill.schedulers
.FEW_STEP_RULES). Where the template leaves ``scheduler``, ``steps`` or ``guidance`` out they
take the method's values (as do values inherited from ``defaults`` when ``sampling`` is the
template's own); a value given beside ``sampling`` must suit it, or the file is refused with
the line and field. A method without classifier-free guidance gets guidance 0: the workers
then run the denoiser once per step and do not encode the negative prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import yaml

from db.job_options import FastPathSpec, SamplingSpec
from pixelmill.errors import InputError
from pixelmill.schedulers import FEW_STEP_RULES, FewStepRule

FEW_STEP_KEYS = frozenset({"sampling", "fast_path"})
_SAMPLING_KEYS = frozenset({"method", "eta"})
_FAST_PATH_KEYS = frozenset({"channels_last", "fuse_qkv", "compile", "fp8", "deepcache"})
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

Entry = tuple[yaml.Node, yaml.Node]


class NodeReader(Protocol):
    """What this module needs from the template loader."""

    def error(self, node: yaml.Node | None, field: str | None, reason: str) -> InputError: ...

    def mapping(
        self, node: yaml.Node, field: str | None, allowed: frozenset[str] | None
    ) -> dict[str, Entry]: ...

    def scalar(self, node: yaml.Node) -> Any: ...

    def is_null(self, node: yaml.Node) -> bool: ...


@dataclass(frozen=True)
class FewStep:
    """A template's checked choices: the job options' parts and the settings they fix."""

    sampling: SamplingSpec | None
    fast_path: FastPathSpec | None
    values: dict[str, Any]  # the template's settings, scheduler/steps/guidance as sampled


class FewStepReader:
    def __init__(self, reader: NodeReader) -> None:
        self.reader = reader

    def read(
        self,
        own: dict[str, Entry],
        defaults: dict[str, Entry],
        values: dict[str, Any],
        *,
        prefix: str,
    ) -> FewStep:
        """``own``/``defaults``: the template's and the defaults' entries; ``values``: its
        settings as merged (builtin < defaults < own)."""
        fast_path = None
        if (located := _pick(own, defaults, "fast_path", prefix)) is not None:
            fast_path = self._fast_path(*located)
        located = _pick(own, defaults, "sampling", prefix)
        if located is None:
            return FewStep(None, fast_path, values)
        field, node = located
        method, eta_node = self._method(field, node)
        if method is None:
            return FewStep(None, fast_path, values)
        rule = FEW_STEP_RULES[method]
        # Values beside the sampling (the template's own, or all of defaults' when sampling
        # comes from there) must suit it; the others give way to the method's.
        given = own if "sampling" in own else {**defaults, **own}
        given_prefix = {name: (prefix if name in own else "defaults") for name in given}
        sampled = dict(values)
        sampled["scheduler"] = self._scheduler(rule, given, given_prefix, values)
        sampled["steps"] = self._steps(rule, given, given_prefix, values)
        sampled["guidance"] = self._guidance(rule, given, given_prefix, values)
        eta = self._eta(rule, sampled["scheduler"], eta_node, field)
        return FewStep(
            SamplingSpec.model_validate({"method": rule.method, "eta": eta}), fast_path, sampled
        )

    def _method(self, field: str, node: yaml.Node) -> tuple[str | None, yaml.Node | None]:
        eta_node = None
        method_node = node
        if isinstance(node, yaml.MappingNode):
            entries = self.reader.mapping(node, field, _SAMPLING_KEYS)
            if "method" not in entries:
                raise self.reader.error(node, f"{field}.method", "is required")
            method_node = entries["method"][1]
            eta_node = entries.get("eta", (None, None))[1]
            field = f"{field}.method"
        value = self.reader.scalar(method_node)
        if value is None:
            return None, None  # "sampling: null" in a template: not few-step after all
        known = ", ".join(FEW_STEP_RULES)
        if not isinstance(value, str) or value.strip().lower() not in FEW_STEP_RULES:
            raise self.reader.error(
                method_node, field, f"unknown few-step method {value!r} (known: {known})"
            )
        return value.strip().lower(), eta_node

    def _scheduler(
        self,
        rule: FewStepRule,
        given: dict[str, Entry],
        where: dict[str, str],
        values: dict[str, Any],
    ) -> str:
        if "scheduler" not in given or values["scheduler"] is None:
            return rule.default_scheduler()
        if values["scheduler"] not in rule.schedulers:
            raise self.reader.error(
                given["scheduler"][1],
                f"{where['scheduler']}.scheduler",
                f"scheduler {values['scheduler']!r} does not suit few-step sampling "
                f"{rule.method!r} ({rule.about}): use {' or '.join(rule.schedulers)}, or leave "
                "it out",
            )
        return str(values["scheduler"])

    def _steps(
        self,
        rule: FewStepRule,
        given: dict[str, Entry],
        where: dict[str, str],
        values: dict[str, Any],
    ) -> int:
        if "steps" not in given:
            return rule.default_steps
        steps = int(values["steps"])
        if not rule.min_steps <= steps <= rule.max_steps:
            raise self.reader.error(
                given["steps"][1],
                f"{where['steps']}.steps",
                f"few-step sampling {rule.method!r} ({rule.about}) takes "
                f"{rule.min_steps}..{rule.max_steps} steps, got {steps}",
            )
        return steps

    def _guidance(
        self,
        rule: FewStepRule,
        given: dict[str, Entry],
        where: dict[str, str],
        values: dict[str, Any],
    ) -> float:
        if "guidance" not in given:
            return rule.guidance
        guidance = float(values["guidance"])
        if guidance > rule.max_guidance:
            without = (
                " (it runs without classifier-free guidance)" if rule.max_guidance <= 1 else ""
            )
            raise self.reader.error(
                given["guidance"][1],
                f"{where['guidance']}.guidance",
                f"few-step sampling {rule.method!r}{without} takes guidance at most "
                f"{rule.max_guidance:g}, got {guidance:g}",
            )
        return guidance

    def _eta(
        self, rule: FewStepRule, scheduler: str, node: yaml.Node | None, field: str
    ) -> float | None:
        if node is None:
            return rule.eta if scheduler == "tcd" else None
        if scheduler != "tcd":
            raise self.reader.error(
                node, f"{field}.eta", f"eta is TCD's gamma; scheduler {scheduler!r} takes none"
            )
        value = self.reader.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise self.reader.error(node, f"{field}.eta", "must be a number in 0..1")
        return float(value)

    def _fast_path(self, field: str, node: yaml.Node) -> FastPathSpec | None:
        if self.reader.is_null(node):
            return None
        entries = self.reader.mapping(node, field, _FAST_PATH_KEYS)
        values: dict[str, Any] = {}
        for name, (_key, value_node) in entries.items():
            values.update(self._fast_path_option(name, value_node, f"{field}.{name}"))
        return FastPathSpec(**values)

    def _fast_path_option(self, name: str, node: yaml.Node, field: str) -> dict[str, Any]:
        value = self.reader.scalar(node)
        if name == "compile":
            mode = "off" if value is False else value
            if mode not in COMPILE_MODES:
                raise self.reader.error(node, field, f"must be one of {', '.join(COMPILE_MODES)}")
            return {"compile": mode}
        if name == "deepcache":
            if value is None or value is False:
                return {}
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 10:
                raise self.reader.error(
                    node, field, "must be the interval of full UNet steps, 2..10 (or false)"
                )
            return {"deepcache_interval": value}
        if not isinstance(value, bool):
            raise self.reader.error(node, field, "must be true or false")
        return {name: value}


def _pick(
    own: dict[str, Entry], defaults: dict[str, Entry], name: str, prefix: str
) -> tuple[str, yaml.Node] | None:
    if name in own:
        return f"{prefix}.{name}", own[name][1]
    if name in defaults:
        return f"defaults.{name}", defaults[name][1]
    return None
