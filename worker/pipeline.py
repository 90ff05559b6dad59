"""Loading diffusers pipelines and rendering a job's seeds in batches.

A worker keeps a few pipelines warm (:class:`PipelineCache`) and renders a job's seeds with
:func:`render_batch`. Each seed gets its own generator and every call a fresh scheduler, so an
image depends only on (model, params, seed): re-rendering a single seed later (retries,
"re-roll just this one" in review) reproduces what the sweep produced. (Batched and single
renders start from bit-identical noise; PyTorch kernels are not batch-invariant, so their
pixels may differ by a rounding step in a few places: see tests/worker/test_pipeline.py.)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import re
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import diffusers
import PIL.Image
import torch
from diffusers import (
    AutoPipelineForText2Image,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

# Imported from its module: under mypy, `from diffusers import DiffusionPipeline` resolves
# to diffusers' dummy placeholder class.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import is_accelerate_available
from packaging.version import Version

from db.job_options import EmbeddingRef, LoraRef
from monitoring import metrics
from pixelmill.schedulers import SCHEDULER_LABELS, canonical_scheduler
from pixelmill.settings import is_hub_id
from worker import conditioning
from worker.adapters import applied_adapters
from worker.prompt_weights import (
    encode_prompts,
    needs_weighting,
    parse_prompt_attention,
    plain_text,
)


@dataclasses.dataclass(frozen=True)
class RenderParams:
    """What one render call needs. ``prompt``/``negative_prompt`` are as the user wrote them
    (A1111 weights included); the kind's images are already at width x height
    (:func:`worker.conditioning.prepare_inputs`)."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str | None = None  # None/"default" = the model's own
    kind: str = conditioning.TXT2IMG
    init_image: PIL.Image.Image | None = None  # img2img, inpaint: RGB
    mask_image: PIL.Image.Image | None = None  # inpaint: L, white generated, black kept
    # inpaint: the RGBA image composited over the result, its opaque pixels kept exactly
    # (conditioning.keep_masked); None: init_image where mask_image is black.
    overlay: PIL.Image.Image | None = None
    control_image: PIL.Image.Image | None = None  # controlnet: RGB
    strength: float | None = None  # img2img, inpaint
    controlnet: Any = None  # controlnet: a loaded ControlNetModel (PipelineCache.controlnet)
    controlnet_scale: float = 1.0
    loras: tuple[LoraRef, ...] = ()
    embeddings: tuple[EmbeddingRef, ...] = ()


@dataclasses.dataclass(frozen=True)
class RenderedImage:
    image: PIL.Image.Image
    seed: int
    nsfw: bool | None  # None when the pipeline has no safety checker
    seconds: float  # this image's share of its batch's render time


# The built-in null model: flat images, no compute. It measures what the system itself costs
# per job (claim, encode, upload, rows): benchmarks/worker.py --null.
NULL_MODEL = "null"


class NullPipeline:
    """Stands in for a diffusers pipeline and renders flat grey images instantly."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.scheduler = EulerDiscreteScheduler()


# --- schedulers ---------------------------------------------------------------------------


def _dpmpp_2m(config: Any, *, karras: bool) -> Any:
    # Force the DPM++ 2M settings: a model's own config may carry another algorithm/order.
    return DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras
    )


# Canonical name (pixelmill.schedulers, which also maps the other spellings) -> a function
# building a new scheduler instance from a scheduler config. Every name there needs one here
# (tests/worker/test_pipeline.py checks).
_SCHEDULER_FACTORIES: dict[str, Callable[[Any], Any]] = {
    "euler": EulerDiscreteScheduler.from_config,
    "euler_a": EulerAncestralDiscreteScheduler.from_config,
    "ddim": DDIMScheduler.from_config,
    "dpmpp_2m": lambda c: _dpmpp_2m(c, karras=False),
    "dpmpp_2m_karras": lambda c: _dpmpp_2m(c, karras=True),
    "pndm": PNDMScheduler.from_config,
}


# The scheduler each pipeline was loaded with, so "default" can be restored after a job
# used another one. Weak keys: evicting a pipeline from the cache must free it.
_DEFAULT_SCHEDULERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _default_scheduler(pipe: DiffusionPipeline) -> Any:
    if pipe not in _DEFAULT_SCHEDULERS:
        # `scheduler` is a component of concrete pipelines, not declared on the base class.
        _DEFAULT_SCHEDULERS[pipe] = getattr(pipe, "scheduler")  # noqa: B009
    return _DEFAULT_SCHEDULERS[pipe]


def apply_scheduler(pipe: DiffusionPipeline, name: str | None) -> None:
    """Install a fresh scheduler called ``name`` (None/"default": the model's own) on ``pipe``.

    A new instance every call: schedulers carry per-run state (multistep history, step
    index), and a fresh one guarantees nothing leaks from one render into the next.
    Building one from a config is cheap (no weights).
    """
    canonical = canonical_scheduler(name)
    default = _default_scheduler(pipe)
    # Always derive from the model's own config (not the currently installed scheduler),
    # so the result does not depend on which scheduler the previous job used.
    if canonical is None:
        scheduler = type(default).from_config(default.config)
    else:
        scheduler = _SCHEDULER_FACTORIES[canonical](default.config)
    # setattr: `scheduler` is not declared on the DiffusionPipeline base class (see above).
    setattr(pipe, "scheduler", scheduler)  # noqa: B010


def scheduler_label(name: str | None, *, pipe: DiffusionPipeline | None = None) -> str:
    """The AUTOMATIC1111 sampler label for ``name``, e.g. "Euler a" or "DPM++ 2M Karras".

    For the model's own scheduler (None/"default") this is the scheduler's class name,
    e.g. "PNDMScheduler", which needs ``pipe``; without it the label is "default".
    """
    canonical = canonical_scheduler(name)
    if canonical is not None:
        return SCHEDULER_LABELS[canonical]
    if pipe is None:
        return "default"
    return type(_default_scheduler(pipe)).__name__


# --- inputs and devices -------------------------------------------------------------------


def check_inputs(params: RenderParams) -> None:
    """Raise ValueError, naming the offending field, if ``params`` cannot be rendered."""
    for field in ("width", "height"):
        value = getattr(params, field)
        # bool is an int subclass; True is not a size.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
            raise ValueError(f"{field} must be a positive multiple of 8, got {value!r}")
    if isinstance(params.steps, bool) or not isinstance(params.steps, int) or params.steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {params.steps!r}")
    guidance = params.guidance
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, int | float)
        or not math.isfinite(guidance)
        or guidance < 0
    ):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if not isinstance(params.prompt, str):
        raise ValueError(f"prompt must be a string, got {type(params.prompt).__name__}")
    if not isinstance(params.negative_prompt, str):
        raise ValueError(
            f"negative_prompt must be a string, got {type(params.negative_prompt).__name__}"
        )
    canonical_scheduler(params.scheduler)
    for field in ("prompt", "negative_prompt"):
        try:
            parse_prompt_attention(getattr(params, field))
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from exc
    _check_kind_inputs(params)


def _check_image(params: RenderParams, field: str, mode: str) -> None:
    image = getattr(params, field)
    if image is None:
        raise ValueError(f"{field} is required for a {params.kind} job")
    if image.size != (params.width, params.height) or image.mode != mode:
        raise ValueError(
            f"{field} must be a {mode} image of {params.width}x{params.height}, got "
            f"{image.mode} {image.width}x{image.height}"
        )


def _check_kind_inputs(params: RenderParams) -> None:
    kind = params.kind
    if kind not in conditioning.KINDS:
        known = ", ".join(conditioning.KINDS)
        raise ValueError(f"kind: unknown job kind {kind!r}; expected {known}")
    if kind in (conditioning.IMG2IMG, conditioning.INPAINT):
        _check_image(params, "init_image", "RGB")
        strength = params.strength
        if (
            isinstance(strength, bool)
            or not isinstance(strength, int | float)
            or not 0 < strength <= 1
        ):
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
        # diffusers runs int(steps * strength) denoising steps and refuses zero.
        if int(params.steps * strength) < 1:
            raise ValueError(
                f"steps x strength must be at least 1 (got {params.steps} x {strength}): raise "
                "the steps or the strength"
            )
    if kind == conditioning.INPAINT:
        _check_image(params, "mask_image", "L")
        if params.overlay is not None:
            _check_image(params, "overlay", "RGBA")
    if kind == conditioning.CONTROLNET:
        _check_image(params, "control_image", "RGB")
        scale = params.controlnet_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or scale < 0:
            raise ValueError(f"controlnet_scale must be a number >= 0, got {scale!r}")


_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda if available else cpu; "cpu", "cuda", "cuda:N" as given.

    Explicit names are not checked against the hardware: asking for cuda on a host without
    it fails loudly when the model is moved there, which is what a misconfigured GPU worker
    should do (rather than silently rendering on CPU).
    """
    normalized = name.strip().lower()
    if normalized == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE_RE.fullmatch(normalized):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    return torch.device(normalized)


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (half the memory, tensor cores); float32 elsewhere (CPU half is slow)."""
    return torch.float16 if device.type == "cuda" else torch.float32


# --- loading ------------------------------------------------------------------------------

# diffusers renamed from_pretrained's `torch_dtype` to `dtype` and warns on the old name;
# 0.42 is the first version this project verified with `dtype`.
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


def _has_safety_checker(path: pathlib.Path) -> bool:
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    entry = index.get("safety_checker") if isinstance(index, dict) else None
    return isinstance(entry, list) and entry[0] is not None


def _without_safety_checker(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Not loaded at all (a real checker is a 1.2 GB CLIP model), and no "you disabled the
    # safety checker" notice: that is what the setting asks for.
    return {**kwargs, "safety_checker": None, "requires_safety_checker": False}


def keep_flagged_pixels(pipe: DiffusionPipeline) -> None:
    """Make the pipeline's safety checker flag images without blacking them out.

    diffusers replaces a flagged image with a black one. pixelmill records the flag itself
    (the image row says ``flagged``, the object goes to quarantine or nowhere), so reviewers
    of the quarantine need the real pixels, and a black image can never be mistaken for a
    result. No-op for pipelines without a checker.
    """
    if getattr(pipe, "safety_checker", None) is None or not hasattr(pipe, "run_safety_checker"):
        return
    check = pipe.run_safety_checker

    def run_safety_checker(image: Any, device: Any, dtype: Any) -> tuple[Any, Any]:
        kept = image.clone() if isinstance(image, torch.Tensor) else image.copy()
        _checked, flags = check(image, device, dtype)
        return kept, flags

    # An instance attribute: DiffusionPipeline.__setattr__ only treats config components
    # specially.
    setattr(pipe, "run_safety_checker", run_safety_checker)  # noqa: B010


SINGLE_FILE_SUFFIX = ".safetensors"

# Every checkpoint in the original (LDM) layout keeps its UNet here, and an SDXL one has a
# second text encoder under the other prefix.
_LDM_UNET_PREFIX = "model.diffusion_model."
_SDXL_KEY_PREFIX = "conditioner.embedders.1."


def _single_file_pipeline_class(path: pathlib.Path) -> Any:
    """StableDiffusionXLPipeline for an SDXL checkpoint, StableDiffusionPipeline otherwise."""
    # From their modules: under mypy the package-level names are dummy placeholders.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .safetensors checkpoint ({exc})") from exc
    if not any(key.startswith(_LDM_UNET_PREFIX) for key in keys):
        # e.g. one diffusers component file: from_single_file would fail deep inside with an
        # error that names neither the file nor the fix.
        raise ValueError(
            f"{path}: not a Stable Diffusion checkpoint in the original layout (no "
            f"{_LDM_UNET_PREFIX}* weights); give a diffusers folder as the model instead"
        )
    if any(key.startswith(_SDXL_KEY_PREFIX) for key in keys):
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def _load_single_file(
    path: pathlib.Path, *, config: str | None, kwargs: dict[str, Any]
) -> DiffusionPipeline:
    if path.suffix != SINGLE_FILE_SUFFIX:
        # .ckpt files are pickles: loading one can run arbitrary code.
        raise ValueError(
            f"{path}: single-file models must be {SINGLE_FILE_SUFFIX} checkpoints "
            "(convert pickled .ckpt files to safetensors first)"
        )
    if config is None:
        raise ValueError(
            f"{path}: a single-file checkpoint needs PIXELMILL_MODEL_CONFIG_DIR, a diffusers "
            "folder with the same architecture (e.g. `pixelmill model synthetic --arch sd15 "
            "--out DIR`), so that no config is downloaded"
        )
    pipeline_class = _single_file_pipeline_class(path)
    config_path = pathlib.Path(config).expanduser()
    local = config_path.exists()
    pipe: DiffusionPipeline = pipeline_class.from_single_file(
        str(path),
        config=str(config_path) if local else config,
        local_files_only=local,
        **kwargs,
    )
    return pipe


def load_pipeline(
    model: str,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    safety_checker: bool = True,
    config: str | None = None,
    compile_unet: bool = False,
) -> DiffusionPipeline:
    """Load ``model`` onto ``device`` in ``dtype`` (default: float16 on CUDA, else float32).

    ``model`` is a local diffusers folder or a Hub id (through diffusers' text-to-image auto
    pipeline, which picks SD 1.x/2.x or SDXL from the folder's model_index.json), a single
    ``.safetensors`` checkpoint in the original layout (with ``config``, a diffusers folder or
    Hub id describing its architecture), or :data:`NULL_MODEL`.

    Local models are loaded with ``local_files_only=True`` so a worker never reaches the
    network for a model it was told is on disk. The safety checker is kept when present
    (it flags images without blacking them out, see :func:`keep_flagged_pixels`), unless
    ``safety_checker`` is False: then it is not loaded and images come out unchecked.
    Attention uses PyTorch's scaled_dot_product_attention (diffusers' default processor on
    torch 2); ``compile_unet`` compiles the UNet with torch.compile.
    """
    if model == NULL_MODEL:
        return NullPipeline()  # type: ignore[return-value]
    dtype = default_dtype(device) if dtype is None else dtype
    kwargs: dict[str, Any] = {
        _DTYPE_KWARG: dtype,
        # Stated explicitly so diffusers doesn't log an "install accelerate" warning.
        "low_cpu_mem_usage": is_accelerate_available(),
    }
    path = pathlib.Path(model).expanduser()
    if path.is_file():
        if not safety_checker:
            kwargs = _without_safety_checker(kwargs)
        pipe = _load_single_file(path, config=config, kwargs=kwargs)
    elif path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{model}: not a diffusers pipeline folder (no model_index.json)"
            )
        if not safety_checker and _has_safety_checker(path):
            kwargs = _without_safety_checker(kwargs)
        pipe = AutoPipelineForText2Image.from_pretrained(str(path), local_files_only=True, **kwargs)
    elif is_hub_id(model):
        # Needs network (or a populated HF cache); honours HF_HUB_OFFLINE.
        if not safety_checker:
            kwargs = _without_safety_checker(kwargs)
        pipe = AutoPipelineForText2Image.from_pretrained(model, **kwargs)
    else:
        raise FileNotFoundError(f"model folder not found: {model}")
    pipe.set_progress_bar_config(disable=True)
    # dtype was applied while loading; casting again with .to() would make diffusers warn
    # (and could undo modules it deliberately keeps in float32).
    pipe.to(device)
    _default_scheduler(pipe)  # remember the model's own scheduler before any job swaps it
    if safety_checker:
        keep_flagged_pixels(pipe)
    if compile_unet:
        # In place, so the pipeline's components stay what diffusers expects. The first
        # render of each new shape compiles (minutes on big models); later ones are faster.
        getattr(pipe, "unet").compile()  # noqa: B009
    return pipe


def load_controlnet(model: str, *, device: torch.device, dtype: torch.dtype) -> Any:
    """A diffusers ControlNet folder (``config.json`` + weights, loaded offline) or Hub id,
    on ``device`` in ``dtype``."""
    from diffusers import ControlNetModel

    kwargs: dict[str, Any] = {
        _DTYPE_KWARG: dtype,
        "low_cpu_mem_usage": is_accelerate_available(),
    }
    path = pathlib.Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{model}: not a diffusers ControlNet folder (no config.json)")
        controlnet = ControlNetModel.from_pretrained(str(path), local_files_only=True, **kwargs)
    elif is_hub_id(model):
        controlnet = ControlNetModel.from_pretrained(model, **kwargs)
    else:
        raise FileNotFoundError(f"ControlNet folder not found: {model}")
    return controlnet.to(device)


# --- rendering ----------------------------------------------------------------------------


def render_batch(
    pipe: DiffusionPipeline, params: RenderParams, seeds: list[int]
) -> list[RenderedImage]:
    """Render one image per seed in a single pipeline call.

    Each seed has its own generator: the initial latents (and any ancestral noise) of an
    image come from its seed alone, whatever else is in the batch. ``pipe`` is the cached
    base (text-to-image) pipeline; other kinds render through a pipeline made from it
    (:func:`worker.conditioning.kind_pipeline`). The job's adapters are loaded for this call
    and removed after it (:func:`worker.adapters.applied_adapters`), even on error.
    """
    check_inputs(params)
    if not seeds:
        raise ValueError("seeds must not be empty")
    if isinstance(pipe, NullPipeline):
        return _keep_masked(params, _render_null(params, seeds))
    if params.kind == conditioning.CONTROLNET and params.controlnet is None:
        raise ValueError("controlnet: a controlnet job needs a loaded ControlNet model")
    with applied_adapters(pipe, params.loras, params.embeddings):
        kind_pipe = _kind_pipeline(pipe, params)
        apply_scheduler(kind_pipe, params.scheduler)
        generators = [torch.Generator(device=pipe.device).manual_seed(seed) for seed in seeds]
        count = len(seeds)
        # Concrete pipelines define __call__; the DiffusionPipeline base class does not.
        run: Callable[..., Any] = kind_pipe
        started = time.perf_counter()
        output = run(
            **_prompt_kwargs(kind_pipe, params, count),
            **conditioning.kind_kwargs(params.kind, params),
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            num_images_per_prompt=1,
            generator=generators,
            output_type="pil",
        )
        seconds = (time.perf_counter() - started) / count
    flags = getattr(output, "nsfw_content_detected", None)
    rendered = [
        RenderedImage(
            image=image, seed=seed, nsfw=None if flags is None else bool(flags[i]), seconds=seconds
        )
        for i, (image, seed) in enumerate(zip(output.images, seeds, strict=True))
    ]
    return _keep_masked(params, rendered)


def _kind_pipeline(pipe: DiffusionPipeline, params: RenderParams) -> Any:
    if params.kind == conditioning.TXT2IMG:
        return pipe
    derived = conditioning.kind_pipeline(pipe, params.kind, params.controlnet)
    # "default" means the base model's own scheduler, whatever the base pipeline holds now.
    _DEFAULT_SCHEDULERS[derived] = _default_scheduler(pipe)
    # from_pipe builds a new object: flag without blacking out here too.
    keep_flagged_pixels(derived)
    return derived


def _prompt_kwargs(pipe: Any, params: RenderParams, count: int) -> dict[str, Any]:
    """Plain prompts go to the pipeline as text, exactly as before prompt weights existed;
    weighted or over-long ones as compel embeddings (see worker.prompt_weights)."""
    if needs_weighting(pipe, params.prompt, params.negative_prompt):
        return encode_prompts(pipe, params.prompt, params.negative_prompt).pipeline_kwargs(count)
    prompt = plain_text(parse_prompt_attention(params.prompt))
    negative = plain_text(parse_prompt_attention(params.negative_prompt))
    return {
        "prompt": [prompt] * count,
        "negative_prompt": [negative] * count if negative else None,
    }


def _keep_masked(params: RenderParams, rendered: list[RenderedImage]) -> list[RenderedImage]:
    """Inpaint: the kept pixels are exactly the input's (the VAE would shift them slightly)."""
    if params.kind != conditioning.INPAINT:
        return rendered
    overlay = params.overlay
    if overlay is None:
        assert params.init_image is not None and params.mask_image is not None  # check_inputs
        overlay = conditioning.mask_overlay(params.init_image, params.mask_image)
    return [
        dataclasses.replace(image, image=conditioning.keep_masked(image.image, overlay))
        for image in rendered
    ]


def render_seed(pipe: DiffusionPipeline, params: RenderParams, seed: int) -> RenderedImage:
    """Render one image for ``seed``. Same (pipe, params, seed) -> pixel-identical image."""
    return render_batch(pipe, params, [seed])[0]


def _render_null(params: RenderParams, seeds: list[int]) -> list[RenderedImage]:
    started = time.perf_counter()
    images = [PIL.Image.new("RGB", (params.width, params.height), (128, 128, 128)) for _ in seeds]
    seconds = (time.perf_counter() - started) / len(seeds)
    return [
        RenderedImage(image=image, seed=seed, nsfw=None, seconds=seconds)
        for image, seed in zip(images, seeds, strict=True)
    ]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A warm pipeline and what identifies the model behind it."""

    pipe: DiffusionPipeline
    sha256: str | None  # of the weight files (worker.identity); None for hub ids, "null"
    load_seconds: float


class PipelineCache:
    """Keeps up to ``max_models`` pipelines loaded, evicting the least recently used."""

    def __init__(
        self,
        *,
        device: torch.device,
        dtype: torch.dtype | None = None,
        max_models: int = 2,
        safety_checker: bool = True,
        config: str | None = None,
        compile_unet: bool = False,
        hash_cache: pathlib.Path | None = None,
        max_controlnets: int = 2,
    ) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self.device = device
        self.safety_checker = safety_checker
        self.dtype = default_dtype(device) if dtype is None else dtype
        self.max_models = max_models
        self.config = config
        self.compile_unet = compile_unet
        self.hash_cache = hash_cache
        self._models: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        # ControlNets are small next to their base model; a few stay warm, least recently
        # used evicted first.
        self.max_controlnets = max_controlnets
        self._controlnets: collections.OrderedDict[str, Any] = collections.OrderedDict()
        # Threaded Celery pools could otherwise load the same model twice at once.
        self._lock = threading.Lock()

    def __contains__(self, model: str) -> bool:
        return model in self._models

    def __len__(self) -> int:
        return len(self._models)

    def get(self, model: str) -> DiffusionPipeline:
        return self.load(model).pipe

    def load(self, model: str) -> LoadedModel:
        from worker.identity import model_sha256

        with self._lock:
            loaded = self._models.get(model)
            if loaded is not None:
                self._models.move_to_end(model)
                return loaded
            # Evict before loading so peak GPU memory holds at most max_models pipelines.
            while len(self._models) >= self.max_models:
                self._models.popitem(last=False)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            started = time.perf_counter()
            pipe = load_pipeline(
                model,
                device=self.device,
                dtype=self.dtype,
                safety_checker=self.safety_checker,
                config=self.config,
                compile_unet=self.compile_unet,
            )
            load_seconds = time.perf_counter() - started
            metrics.MODEL_LOAD_SECONDS.observe(load_seconds)
            # Hashed after a successful load: a model that cannot load is not hashed at all.
            sha256 = (
                None if model == NULL_MODEL else model_sha256(model, cache_file=self.hash_cache)
            )
            loaded = LoadedModel(pipe=pipe, sha256=sha256, load_seconds=load_seconds)
            self._models[model] = loaded
            return loaded

    def discard(self, model: str) -> None:
        """Forget ``model`` (e.g. a pipeline left in an unknown state): the next job loads it
        again."""
        with self._lock:
            self._models.pop(model, None)

    def controlnet(self, model: str) -> Any:
        """The ControlNet ``model`` (folder or Hub id) on this cache's device and dtype,
        loaded once and kept warm like the pipelines."""
        with self._lock:
            controlnet = self._controlnets.get(model)
            if controlnet is not None:
                self._controlnets.move_to_end(model)
                return controlnet
            while len(self._controlnets) >= self.max_controlnets:
                self._controlnets.popitem(last=False)
            controlnet = load_controlnet(model, device=self.device, dtype=self.dtype)
            self._controlnets[model] = controlnet
            return controlnet
