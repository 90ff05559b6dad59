"""Loading diffusers pipelines onto a device, and keeping a few of them warm.

A job names its model: a diffusers folder, a single ``.safetensors`` checkpoint, a Hub id or
:data:`NULL_MODEL`. A worker process loads each once into its :class:`PipelineCache`, which
keeps the most recently used ones. A model that is not there, or that diffusers cannot read as
a pipeline, is the job's bad input (:class:`worker.errors.JobInputError`): another attempt
would fail the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
import threading
import time
from typing import Any

import diffusers
import torch
from diffusers import AutoPipelineForText2Image, EulerDiscreteScheduler

# Imported from its module: under mypy, `from diffusers import DiffusionPipeline` resolves
# to diffusers' dummy placeholder class.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import is_accelerate_available
from packaging.version import Version

from pixelmill.settings import is_hub_id
from worker import families, metrics, safety
from worker.errors import JobInputError
from worker.families import FamilyInfo, FamilyOptions
from worker.schedulers import default_scheduler

# The built-in null model: flat images, no compute. It measures what the system itself costs
# per job (claim, encode, upload, rows): benchmarks/worker.py --null.
NULL_MODEL = "null"


class NullPipeline:
    """Stands in for a diffusers pipeline and renders flat grey images instantly."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.scheduler = EulerDiscreteScheduler()


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
    family_options: FamilyOptions | None = None,
) -> DiffusionPipeline:
    """Load ``model`` onto ``device`` in ``dtype`` (default: float16 on CUDA, bfloat16 for
    SD3 and FLUX there, float32 elsewhere).

    ``model`` is a local diffusers folder or a Hub id (through diffusers' text-to-image auto
    pipeline, which picks SD 1.x/2.x, SDXL, SD3 or FLUX.1 from the folder's
    model_index.json, text encoders included: see :mod:`worker.families`), a single
    ``.safetensors`` checkpoint in the original layout (with ``config``, a diffusers folder or
    Hub id describing its architecture), or :data:`NULL_MODEL`.

    Local models are loaded with ``local_files_only=True`` so a worker never reaches the
    network for a model it was told is on disk. The safety checker is kept when present
    (it flags images without blacking them out, see :func:`keep_flagged_pixels`), unless
    ``safety_checker`` is False: then it is not loaded and images come out unchecked. A
    pipeline without a checker of its own (SD3, FLUX) gets a separate safety step when its
    folder or ``family_options`` provide a checker (:mod:`worker.safety`).
    Attention uses PyTorch's scaled_dot_product_attention (diffusers' default processor on
    torch 2); ``compile_unet`` compiles the denoiser (UNet or transformer) with torch.compile.
    """
    if model == NULL_MODEL:
        return NullPipeline()  # type: ignore[return-value]
    options = family_options or FamilyOptions()
    options.check_device(device)
    if dtype is None:
        family = families.family_of_class(_pipeline_class_name(model) or "")
        dtype = families.compute_dtype(family, device, default_dtype(device))
    kwargs: dict[str, Any] = {
        _DTYPE_KWARG: dtype,
        # Stated explicitly so diffusers doesn't log an "install accelerate" warning.
        "low_cpu_mem_usage": is_accelerate_available(),
    }
    pipe = _from_source(model, kwargs, safety_checker=safety_checker, config=config)
    pipe.set_progress_bar_config(disable=True)
    # dtype was applied while loading; casting again with .to() would make diffusers warn
    # (and could undo modules it deliberately keeps in float32).
    families.place(pipe, device, options)
    default_scheduler(pipe)  # remember the model's own scheduler before any job swaps it
    if safety_checker:
        keep_flagged_pixels(pipe)
        if getattr(pipe, "safety_checker", None) is None:
            _attach_safety_step(pipe, model, options, device)
    if compile_unet:
        # In place, so the pipeline's components stay what diffusers expects. The first
        # render of each new shape compiles (minutes on big models); later ones are faster.
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer")  # noqa: B009
        denoiser.compile()
    return pipe


def _attach_safety_step(
    pipe: DiffusionPipeline, model: str, options: FamilyOptions, device: torch.device
) -> None:
    """A checker for a pipeline without one, run after decoding (worker.safety), if the model's
    folder or the settings provide one."""
    step = safety.load_safety_step(
        model, configured=options.safety_checker_model, device=device, dtype=default_dtype(device)
    )
    safety.attach(pipe, step)


def _pipeline_class_name(model: str) -> str | None:
    """The pipeline class a diffusers folder or Hub id names (None: a single file, or no
    readable model_index.json; loading then reports what is wrong)."""
    path = pathlib.Path(model).expanduser()
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        elif not path.exists() and is_hub_id(model):
            # What from_pretrained reads first anyway (network or the HF cache).
            index = DiffusionPipeline.load_config(model)
        else:
            return None
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name if isinstance(name, str) else None


def _from_source(
    model: str, kwargs: dict[str, Any], *, safety_checker: bool, config: str | None
) -> DiffusionPipeline:
    """The pipeline ``model`` names, from a single checkpoint, a diffusers folder (offline)
    or the Hub, built with ``kwargs`` (its dtype), not yet on its device."""
    pipe: DiffusionPipeline
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


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A warm pipeline and what identifies the model behind it."""

    pipe: DiffusionPipeline
    sha256: str | None  # of the weight files (worker.identity); None for hub ids, "null"
    load_seconds: float
    family: FamilyInfo | None = None  # None: not described (a model loaded by other code)

    def family_metadata(self) -> dict[str, Any] | None:
        """The family, variant and precisions the image's metadata records."""
        return None if self.family is None else self.family.metadata()


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
        family_options: FamilyOptions | None = None,
    ) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self.device = device
        self.safety_checker = safety_checker
        # Offloading on a CPU worker is a setting mistake: refused at start, not per job.
        self.family_options = family_options or FamilyOptions()
        self.family_options.check_device(device)
        # None: each model's own default (bfloat16 for SD3/FLUX on CUDA, see load_pipeline).
        self.requested_dtype = dtype
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
        """``model``, loaded now unless it is warm. A model that is not there, or that is not
        a pipeline diffusers can read, raises JobInputError: the job names a bad model."""
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
            try:
                loaded = self._load(model)
            except (FileNotFoundError, ValueError) as exc:  # another attempt cannot help
                raise JobInputError(str(exc)) from exc
            self._models[model] = loaded
            return loaded

    def _load(self, model: str) -> LoadedModel:
        from worker.identity import model_sha256

        started = time.perf_counter()
        pipe = load_pipeline(
            model,
            device=self.device,
            dtype=self.requested_dtype,
            safety_checker=self.safety_checker,
            config=self.config,
            compile_unet=self.compile_unet,
            family_options=self.family_options,
        )
        load_seconds = time.perf_counter() - started
        metrics.MODEL_LOAD_SECONDS.observe(load_seconds)
        # Hashed after a successful load: a model that cannot load is not hashed at all.
        sha256 = None if model == NULL_MODEL else model_sha256(model, cache_file=self.hash_cache)
        step = safety.step_of(pipe)
        family = families.describe(
            pipe, self.family_options, safety=None if step is None else step.source
        )
        return LoadedModel(pipe=pipe, sha256=sha256, load_seconds=load_seconds, family=family)

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
