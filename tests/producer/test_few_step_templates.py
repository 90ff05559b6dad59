"""Templates' few-step sampling and fast path: the method's scheduler, steps and guidance,
every bad value refused with the file, line and field, and what the job's options carry."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from producer.templates import TemplateError, load_templates
from producer.templates.model import Template


def load(tmp_path: Path, text: str) -> dict[str, Template]:
    path = tmp_path / "templates.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return {template.name: template for template in load_templates(path).templates}


def load_error(tmp_path: Path, text: str) -> TemplateError:
    path = tmp_path / "templates.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(TemplateError) as err:
        load_templates(path)
    assert err.value.path == str(path)
    assert str(path) in str(err.value)
    return err.value


@pytest.mark.parametrize(
    ("method", "scheduler", "steps", "guidance"),
    [
        ("lcm", "lcm", 4, 1.0),
        ("tcd", "tcd", 4, 0.0),
        ("lightning", "euler_trailing", 4, 0.0),
        ("hyper_sd", "ddim_trailing", 4, 0.0),
        ("turbo", "euler_a_trailing", 1, 0.0),
        ("Turbo", "euler_a_trailing", 1, 0.0),
    ],
)
def test_method_sets_scheduler_steps_and_guidance(
    tmp_path: Path, method: str, scheduler: str, steps: int, guidance: float
) -> None:
    templates = load(
        tmp_path,
        f"""
        defaults:
          steps: 30
          guidance: 7.5
          scheduler: dpmpp_2m_karras
        templates:
          fast:
            prompt: "{{{{ title }}}}"
            sampling: {method}
          slow:
            prompt: "{{{{ title }}}}"
        """,
    )
    fast = templates["fast"]
    assert (fast.scheduler, fast.steps, fast.guidance) == (scheduler, steps, guidance)
    sampling = fast.conditioning.options.sampling
    assert sampling is not None and sampling.method == method.lower()
    assert sampling.eta == (0.3 if method == "tcd" else None)
    # The file's other templates keep the defaults.
    slow = templates["slow"]
    assert (slow.scheduler, slow.steps, slow.guidance) == ("dpmpp_2m_karras", 30, 7.5)
    assert slow.conditioning.options.sampling is None


def test_values_beside_the_method_are_kept_when_they_suit(tmp_path: Path) -> None:
    templates = load(
        tmp_path,
        """
        templates:
          a:
            prompt: x
            sampling: {method: hyper_sd, eta: 0.8}
            scheduler: tcd
            steps: 1
            guidance: 6
          b:
            prompt: x
            sampling: lightning
            steps: 8
            guidance: 1
        """,
    )
    a = templates["a"]
    assert (a.scheduler, a.steps, a.guidance) == ("tcd", 1, 6.0)
    assert a.conditioning.options.sampling is not None
    assert a.conditioning.options.sampling.eta == 0.8
    b = templates["b"]
    assert (b.scheduler, b.steps, b.guidance) == ("euler_trailing", 8, 1.0)


def test_sampling_in_defaults_checks_the_defaults(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        """
        defaults:
          sampling: turbo
          steps: 20
        templates:
          a:
            prompt: x
        """,
    )
    assert (err.line, err.field) == (4, "defaults.steps")
    assert err.reason == "few-step sampling 'turbo' (SDXL-Turbo) takes 1..4 steps, got 20"


@pytest.mark.parametrize(
    ("body", "line", "field", "reason"),
    [
        (
            "sampling: lcm4",
            4,
            "templates.a.sampling",
            "unknown few-step method 'lcm4' (known: lcm, tcd, lightning, hyper_sd, turbo)",
        ),
        (
            "sampling: {eta: 0.3}",
            4,
            "templates.a.sampling.method",
            "is required",
        ),
        (
            "sampling: {method: tcd, gamma: 0.3}",
            4,
            "templates.a.sampling.gamma",
            "unknown key (allowed: eta, method)",
        ),
        (
            "sampling: lightning\n    guidance: 5",
            5,
            "templates.a.guidance",
            "few-step sampling 'lightning' (it runs without classifier-free guidance) takes "
            "guidance at most 1, got 5",
        ),
        (
            "sampling: lightning\n    scheduler: euler",
            5,
            "templates.a.scheduler",
            "scheduler 'euler' does not suit few-step sampling 'lightning' (SDXL-Lightning): use "
            "euler_trailing, or leave it out",
        ),
        (
            "sampling: lcm\n    steps: 25",
            5,
            "templates.a.steps",
            "few-step sampling 'lcm' (LCM / LCM-LoRA) takes 1..8 steps, got 25",
        ),
        (
            "sampling: {method: lightning, eta: 0.3}",
            4,
            "templates.a.sampling.eta",
            "eta is TCD's gamma; scheduler 'euler_trailing' takes none",
        ),
        (
            "sampling: {method: tcd, eta: 2}",
            4,
            "templates.a.sampling.eta",
            "must be a number in 0..1",
        ),
        (
            "fast_path: {compile: fast}",
            4,
            "templates.a.fast_path.compile",
            "must be one of off, default, reduce-overhead, max-autotune, "
            "max-autotune-no-cudagraphs",
        ),
        (
            "fast_path: {deepcache: 1}",
            4,
            "templates.a.fast_path.deepcache",
            "must be the interval of full UNet steps, 2..10 (or false)",
        ),
        ("fast_path: {fp8: maybe}", 4, "templates.a.fast_path.fp8", "must be true or false"),
        (
            "fast_path: {tensorrt: true}",
            4,
            "templates.a.fast_path.tensorrt",
            "unknown key (allowed: channels_last, compile, deepcache, fp8, fuse_qkv)",
        ),
    ],
)
def test_bad_values_name_file_line_and_field(
    tmp_path: Path, body: str, line: int, field: str, reason: str
) -> None:
    err = load_error(tmp_path, f"templates:\n  a:\n    prompt: x\n    {body}\n")
    assert (err.line, err.field, err.reason) == (line, field, reason)


def test_fast_path_goes_into_the_options(tmp_path: Path) -> None:
    templates = load(
        tmp_path,
        """
        defaults:
          fast_path: {compile: reduce-overhead}
        templates:
          a:
            prompt: x
          b:
            prompt: x
            fast_path:
              {channels_last: false, fuse_qkv: true, compile: false, fp8: true, deepcache: 3}
          c:
            prompt: x
            fast_path: null
        """,
    )
    a = templates["a"].conditioning.options
    assert a.to_json() == {"fast_path": {"compile": "reduce-overhead"}}
    assert a.canonical() == ""  # exact: the plain job's dedupe key
    b = templates["b"].conditioning.options
    assert b.to_json() == {
        "fast_path": {
            "channels_last": False,
            "fuse_qkv": True,
            "compile": "off",
            "fp8": True,
            "deepcache_interval": 3,
        }
    }
    assert b.canonical() == '{"fast_path":{"deepcache_interval":3,"fp8":true}}'
    assert templates["c"].conditioning.options.to_json() is None
