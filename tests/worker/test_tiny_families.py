"""The tiny SD3 and FLUX.1 folders, built offline and loaded through the worker's loading path;
the families' loading options (T5 in fp8, offload); prompts; `pixelmill model tiny/synthetic`
for the new architectures, and the synthetic folders' released parameter counts."""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pixelmill.families import ModelFamily, read_model_family
from worker import families
from worker.families import FamilyOptions, family_of_class
from worker.loading import PipelineCache, load_pipeline
from worker.pipeline import RenderParams, render_batch
from worker.prompt_weights import PromptWeightsError, encode_prompts, needs_weighting
from worker.synthetic_families import (
    FAMILY_ARCHES,
    FLUX_VAE,
    FamilyArch,
    build_family_pipeline,
    family_arch,
)
from worker.synthetic_model import parameter_counts
from worker.tiny_families import FAMILY_ARCHITECTURES, build_t5_tokenizer, build_tiny_family

CPU = torch.device("cpu")
TRANSFORMER_WEIGHTS = pathlib.Path("transformer") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny-families")
    return {arch: build_tiny_family(root / arch, arch=arch) for arch in FAMILY_ARCHITECTURES}


def params(arch: str, **overrides: Any) -> RenderParams:
    values: dict[str, Any] = {
        "prompt": "a red sneaker",
        "negative_prompt": "",
        "steps": 2,
        "guidance": 0.0 if arch == "flux-schnell" else 3.5,
        "width": 64,
        "height": 64,
        **overrides,
    }
    return RenderParams(**values)


# --- the folders ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "pipeline", "components"),
    [
        (
            "sd3",
            "StableDiffusion3Pipeline",
            ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
        ),
        ("flux", "FluxPipeline", ("transformer", "vae", "text_encoder", "text_encoder_2")),
    ],
)
def test_folder_is_a_complete_pipeline_with_its_own_checker(
    family_dirs: dict[str, pathlib.Path], arch: str, pipeline: str, components: tuple[str, ...]
) -> None:
    folder = family_dirs[arch]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    for component in components:
        assert index[component][0] is not None, component
        assert list((folder / component).glob("*.safetensors")), component
    t5 = "text_encoder_3" if arch == "sd3" else "text_encoder_2"
    assert index[t5] == ["transformers", "T5EncoderModel"]
    # The safety checker beside the pipeline (worker.safety), not listed in model_index.json.
    assert (folder / "safety_checker" / "model.safetensors").is_file()
    assert (folder / "feature_extractor" / "preprocessor_config.json").is_file()
    assert "safety_checker" not in index
    assert not list(folder.rglob("*.bin"))  # nothing pickled


def test_build_is_deterministic(
    tmp_path: pathlib.Path, family_dirs: dict[str, pathlib.Path]
) -> None:
    def digest(folder: pathlib.Path) -> str:
        return hashlib.sha256((folder / TRANSFORMER_WEIGHTS).read_bytes()).hexdigest()

    assert digest(build_tiny_family(tmp_path / "again", arch="flux")) == digest(family_dirs["flux"])
    assert digest(build_tiny_family(tmp_path / "other", arch="flux", seed=1)) != digest(
        family_dirs["flux"]
    )
    with pytest.raises(ValueError, match="arch: unknown architecture 'sd4'"):
        build_tiny_family(tmp_path / "bad", arch="sd4")


def test_t5_tokenizer_is_built_offline(tmp_path: pathlib.Path) -> None:
    tokenizer = build_t5_tokenizer(tmp_path / "t5")
    ids = tokenizer("a red shoe", padding="max_length", max_length=16, truncation=True).input_ids
    # T5's layout: no start token, </s> (1) ends the text, <pad> (0) fills.
    assert ids[0] not in (0, 1, 2)
    end = ids.index(1)
    assert 0 < end < 16 and set(ids[end + 1 :]) == {0}
    assert 2 not in ids  # every character of the prompt is in the vocabulary
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red shoe"


# --- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILY_ARCHITECTURES)
def test_loads_through_the_worker_loading_path(
    family_dirs: dict[str, pathlib.Path], arch: str
) -> None:
    loaded = PipelineCache(device=CPU).load(str(family_dirs[arch]))
    expected = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
    assert type(loaded.pipe).__name__ == expected[arch.removesuffix("-schnell")]
    assert loaded.sha256 is not None
    variant = {"sd3": "3-medium", "flux": "dev", "flux-schnell": "schnell"}[arch]
    assert loaded.family_metadata() == {
        "name": arch.removesuffix("-schnell"),
        "variant": variant,
        "dtype": "float32",
        "t5": "float32",
        "offload": "none",
        "safety": "model",
    }
    assert type(loaded.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("arch", FAMILY_ARCHITECTURES)
def test_the_producer_reads_the_family_the_worker_loads(
    family_dirs: dict[str, pathlib.Path], arch: str
) -> None:
    """What the producer reads from a folder's files is what the worker's rules get from the
    loaded pipeline: family, variant, size multiple."""
    loaded = load_pipeline(str(family_dirs[arch]), device=CPU)
    assert read_model_family(str(family_dirs[arch])) == families.model_family(loaded)


def test_models_the_producer_cannot_read_are_left_to_the_worker(
    tmp_path: pathlib.Path, family_dirs: dict[str, pathlib.Path]
) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    for model in ("tiny", "null", "black-forest-labs/FLUX.1-dev", str(tmp_path / "nowhere")):
        assert read_model_family(model) is None, model
    assert read_model_family(str(tmp_path / "broken")) is None
    # A flux folder without its transformer's config: the family, not the release.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_bytes(
        (family_dirs["flux"] / "model_index.json").read_bytes()
    )
    assert read_model_family(str(partial)) == ModelFamily("flux", None, None, "FluxPipeline")


def test_family_rules_for_dtype_and_class_names() -> None:
    cuda = torch.device("cuda")
    # bfloat16 on CUDA for the families released in it; SD keeps fp16; CPU keeps float32.
    assert families.compute_dtype("flux", cuda, torch.float16) is torch.bfloat16
    assert families.compute_dtype("sd3", cuda, torch.float16) is torch.bfloat16
    assert families.compute_dtype("sdxl", cuda, torch.float16) is torch.float16
    assert families.compute_dtype("flux", CPU, torch.float32) is torch.float32
    assert family_of_class("StableDiffusion3Img2ImgPipeline") == "sd3"
    assert family_of_class("FluxInpaintPipeline") == "flux"
    assert family_of_class("StableDiffusionXLImg2ImgPipeline") == "sdxl"
    assert family_of_class("StableDiffusionControlNetPipeline") == "sd"
    assert family_of_class("Flux2Pipeline") == "other"  # FLUX.2 is another architecture


def t5_linear_dtypes(pipe: Any) -> set[torch.dtype]:
    encoder = families.t5_encoder(pipe)
    assert encoder is not None
    return {
        module.weight.dtype
        for name, module in encoder.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("wo")
    }


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_t5_can_be_stored_in_fp8(family_dirs: dict[str, pathlib.Path], arch: str) -> None:
    model = str(family_dirs[arch])
    plain = PipelineCache(device=CPU).load(model)
    fp8 = PipelineCache(device=CPU, family_options=FamilyOptions(t5_precision="fp8")).load(model)
    assert t5_linear_dtypes(plain.pipe) == {torch.float32}
    assert t5_linear_dtypes(fp8.pipe) == {torch.float8_e4m3fn}
    # What the pipelines cast T5's output to stays the compute dtype.
    encoder = families.t5_encoder(fp8.pipe)
    assert encoder is not None and encoder.dtype == torch.float32
    assert fp8.family is not None and fp8.family.t5 == "float8_e4m3fn"
    a = render_batch(plain.pipe, params(arch), [4])[0]
    b = render_batch(fp8.pipe, params(arch), [4])[0]
    assert b.image.size == (64, 64)
    # Other weights, other pixels: the metadata says which precision made them.
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_offload_is_for_cuda_workers_only() -> None:
    with pytest.raises(ValueError, match=r"PIXELMILL_MODEL_OFFLOAD=model .* renders on cpu"):
        PipelineCache(device=CPU, family_options=FamilyOptions(offload="model"))
    with pytest.raises(ValueError, match="offload: 'disk'"):
        FamilyOptions(offload="disk")  # type: ignore[arg-type]


def test_settings_reach_the_family_options() -> None:
    from pixelmill.settings import Settings

    settings = Settings(  # type: ignore[call-arg]
        t5_precision="fp8", model_offload="sequential", safety_checker_model="owner/checker"
    )
    assert FamilyOptions.from_settings(settings) == FamilyOptions(
        t5_precision="fp8", offload="sequential", safety_checker_model="owner/checker"
    )
    assert FamilyOptions.from_settings(Settings()) == FamilyOptions()  # type: ignore[call-arg]


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["none", "model"])
def test_flux_renders_on_the_gpu_in_bf16(
    family_dirs: dict[str, pathlib.Path], offload: families.Offload
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cache = PipelineCache(
        device=torch.device("cuda"),
        family_options=FamilyOptions(t5_precision="fp8", offload=offload),
    )
    loaded = cache.load(str(family_dirs["flux"]))
    assert loaded.family is not None and loaded.family.dtype == "bfloat16"
    rendered = render_batch(loaded.pipe, params("flux"), [1, 2])
    assert [image.image.size for image in rendered] == [(64, 64)] * 2


# --- prompts ----------------------------------------------------------------------------------


def test_prompts_are_plain_text_for_t5_families(family_dirs: dict[str, pathlib.Path]) -> None:
    pipe = load_pipeline(str(family_dirs["sd3"]), device=CPU)
    # Long prompts are T5's to read (256 tokens), not compel's chunks.
    assert not needs_weighting(pipe, "a red sneaker, " * 40, "blurry")
    assert not needs_weighting(pipe, r"a \(red\) sneaker", "")  # escapes are plain text
    with pytest.raises(PromptWeightsError, match=r"prompt: prompt weights .* SD3 reads plain"):
        needs_weighting(pipe, "a (red:1.2) sneaker", "")
    with pytest.raises(PromptWeightsError, match="compel cannot weight"):
        encode_prompts(pipe, "a (red:1.2) sneaker", "")
    rendered = render_batch(pipe, params("sd3", prompt=r"a \(red\) sneaker, " * 30), [1])
    assert rendered[0].image.size == (64, 64)


def test_flux_dev_guidance_is_an_input_of_the_model(family_dirs: dict[str, pathlib.Path]) -> None:
    """dev embeds its guidance value (different guidance, different pixels); schnell has no
    such input, so pixelmill accepts only 0 for it."""
    pipe = load_pipeline(str(family_dirs["flux"]), device=CPU)
    low = render_batch(pipe, params("flux", guidance=1.0), [2])[0]
    high = render_batch(pipe, params("flux", guidance=6.0), [2])[0]
    assert not np.array_equal(np.asarray(low.image), np.asarray(high.image))


# --- guidance and true CFG --------------------------------------------------------------------


class DenoiserCalls:
    """The batch size of each call of a pipeline's transformer."""

    def __init__(self, pipe: Any) -> None:
        self.batches: list[int] = []

        def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            latents = args[0] if args else kwargs["hidden_states"]
            self.batches.append(latents.shape[0])

        self._hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)

    def __enter__(self) -> DenoiserCalls:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._hook.remove()


@pytest.mark.parametrize(
    ("arch", "overrides", "unconditional"),
    [
        ("sd3", {"negative_prompt": "blurry", "guidance": 3.5}, True),
        ("sd3", {"negative_prompt": "blurry", "guidance": 1.0}, False),
        ("flux", {"guidance": 3.5}, False),  # dev: the guidance is an input of the model
        ("flux", {"negative_prompt": "blurry", "true_cfg": 4.0}, True),
        ("flux", {"true_cfg": 2.0}, True),  # an empty negative prompt: the unconditional pass
        ("flux-schnell", {}, False),
        ("flux-schnell", {"negative_prompt": "blurry", "true_cfg": 3.0}, True),
    ],
)
def test_the_classifier_free_guidance_flag_says_whether_an_unconditional_pass_ran(
    family_dirs: dict[str, pathlib.Path], arch: str, overrides: dict[str, Any], unconditional: bool
) -> None:
    pipe = load_pipeline(str(family_dirs[arch]), device=CPU)
    job = params(arch, **overrides)
    with DenoiserCalls(pipe) as calls:
        rendered = render_batch(pipe, job, [1, 2])
    # The denoiser's work per step for two images: SD3 batches the unconditional half with
    # the conditional one, FLUX's true CFG calls the transformer a second time.
    assert sum(calls.batches) == job.steps * (4 if unconditional else 2)
    if arch.startswith("flux"):
        assert set(calls.batches) == {2}
        assert len(calls.batches) == job.steps * (2 if unconditional else 1)
    assert rendered[0].metadata["classifier_free_guidance"] is unconditional
    assert rendered[0].metadata.get("true_cfg") == overrides.get("true_cfg")


@pytest.mark.parametrize("arch", ["flux", "flux-schnell"])
def test_flux_true_cfg_reads_the_negative_prompt(
    family_dirs: dict[str, pathlib.Path], arch: str
) -> None:
    pipe = load_pipeline(str(family_dirs[arch]), device=CPU)

    def image(**overrides: Any) -> np.ndarray:
        return np.asarray(render_batch(pipe, params(arch, **overrides), [3])[0].image)

    plain = image()
    blurry = image(negative_prompt="blurry", true_cfg=4.0)
    text = image(negative_prompt="text, watermark", true_cfg=4.0)
    stronger = image(negative_prompt="blurry", true_cfg=6.0)
    assert not np.array_equal(plain, blurry)
    assert not np.array_equal(blurry, text)  # the negative prompt is read
    assert not np.array_equal(blurry, stronger)  # and the scale applied
    np.testing.assert_array_equal(blurry, image(negative_prompt="blurry", true_cfg=4.0))


@pytest.mark.parametrize(
    ("arch", "overrides", "message"),
    [
        (
            "flux",
            {"negative_prompt": "blurry"},
            "negative_prompt: FLUX.1 reads a negative prompt only with true CFG (its guidance is "
            "distilled into the model): set true_cfg above 1",
        ),
        (
            "flux-schnell",
            {"negative_prompt": "blurry", "true_cfg": 4.0, "guidance": 3.5},
            "guidance: FLUX.1-schnell takes no guidance (the model has no guidance input), got "
            "3.5: set it to 0",
        ),
        (
            "sd3",
            {"true_cfg": 4.0},
            "true_cfg: true CFG is for FLUX.1 models only; SD3 runs classifier-free guidance "
            "from guidance above 1",
        ),
        ("flux", {"true_cfg": 1.0}, "true_cfg must be a finite number above 1 (or none), got 1.0"),
    ],
)
def test_what_true_cfg_refuses(
    family_dirs: dict[str, pathlib.Path], arch: str, overrides: dict[str, Any], message: str
) -> None:
    pipe = load_pipeline(str(family_dirs[arch]), device=CPU)
    with DenoiserCalls(pipe) as calls, pytest.raises(ValueError) as raised:
        render_batch(pipe, params(arch, **overrides), [1])
    assert message in str(raised.value)
    assert calls.batches == []  # refused before rendering


# --- pixelmill model --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "pipeline"), [("sd3", "StableDiffusion3Pipeline"), ("flux-schnell", "FluxPipeline")]
)
def test_cli_writes_tiny_family_folders(tmp_path: pathlib.Path, arch: str, pipeline: str) -> None:
    out = tmp_path / arch
    result = CliRunner().invoke(app, ["model", "tiny", "--arch", arch, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == pipeline
    result = CliRunner().invoke(
        app, ["model", "tiny", "--arch", "sd4", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert "--arch: unknown architecture 'sd4'; known: sd, sdxl, sd3, flux, flux-schnell" in (
        result.output
    )


# Parameter counts of the released models (as diffusers/transformers count them).
T5_XXL_ENCODER = 4_762_310_656  # google/t5-v1_1-xxl's encoder
CLIP_L = 123_060_480  # CLIP ViT-L/14 text tower
CLIP_L_PROJECTED = 123_650_304  # ... with its 768x768 projection (SD3's first encoder)
CLIP_BIGG_PROJECTED = 694_659_840  # OpenCLIP ViT-bigG/14 text tower with projection
FLOW_VAE = 83_819_683  # the 16-channel VAE of SD3 and FLUX.1


def test_synthetic_flux_has_the_released_parameter_counts() -> None:
    dev = parameter_counts("flux-dev")
    assert dev == {
        "transformer": 11_901_408_320,
        "vae": FLOW_VAE,
        "text_encoder": CLIP_L,
        "text_encoder_2": T5_XXL_ENCODER,
    }
    schnell = parameter_counts("flux-schnell")
    # schnell is dev without the guidance embedder (two 3072-wide linears from 256).
    assert dev["transformer"] - schnell["transformer"] == 256 * 3072 + 3072 + 3072 * 3072 + 3072


def test_synthetic_sd35_has_the_released_architecture() -> None:
    large, medium = parameter_counts("sd35"), parameter_counts("sd35-medium")
    for counts in (large, medium):
        assert counts["text_encoder"] == CLIP_L_PROJECTED
        assert counts["text_encoder_2"] == CLIP_BIGG_PROJECTED
        assert counts["text_encoder_3"] == T5_XXL_ENCODER
        assert counts["vae"] == FLOW_VAE
    assert 8.0e9 < large["transformer"] < 8.1e9  # "8.1B"
    assert 2.2e9 < medium["transformer"] < 2.3e9
    spec = family_arch("sd35-medium")
    assert spec.transformer["dual_attention_layers"] == tuple(range(13))
    assert family_arch("sd35").transformer["qk_norm"] == "rms_norm"


def scaled(arch: str) -> FamilyArch:
    """The released layout of ``arch`` at a few megabytes: the same writer, loader and pipeline
    code as the full-size folder, at a size this machine renders in a second."""
    spec = family_arch(arch)
    clip = {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 32,
    }
    t5 = {**spec.t5, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4}
    vae = {
        **FLUX_VAE,
        "block_out_channels": (8, 8, 8, 8),
        "norm_num_groups": 2,
        "layers_per_block": 1,
    }
    if spec.family == "sd3":
        transformer = {
            **spec.transformer,
            "num_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "caption_projection_dim": 16,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 64,
            # Large has none, Medium its first layers: kept for the first layer.
            "dual_attention_layers": spec.transformer["dual_attention_layers"][:1],
        }
    else:
        transformer = {
            **spec.transformer,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": (4, 4, 8),
        }
    return FamilyArch(
        spec.family, transformer, vae, spec.scheduler, t5=t5, clip=(clip,) * len(spec.clip)
    )


@pytest.mark.parametrize("arch", FAMILY_ARCHES)
def test_synthetic_writer_makes_a_folder_the_worker_renders(
    tmp_path: pathlib.Path, arch: str
) -> None:
    out = build_family_pipeline(tmp_path / arch, spec=scaled(arch), dtype=torch.bfloat16)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == (
        "StableDiffusion3Pipeline" if arch.startswith("sd35") else "FluxPipeline"
    )
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    loaded = PipelineCache(device=CPU).load(str(out))
    assert loaded.family is not None
    assert (
        loaded.family.variant
        == {
            "sd35": "3.5-large",
            "sd35-medium": "3.5-medium",
            "flux-dev": "dev",
            "flux-schnell": "schnell",
        }[arch]
    )
    # Stored in bf16, loaded in the worker's CPU dtype.
    header = (out / TRANSFORMER_WEIGHTS).read_bytes()[:2000]
    assert b'"BF16"' in header
    rendered = render_batch(
        loaded.pipe, params("flux-schnell" if arch == "flux-schnell" else arch), [1]
    )
    assert rendered[0].image.size == (64, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "flux"], "--arch: unknown architecture 'flux'; known: sd15, sdxl, sd35, "),
        (["--arch", "flux-dev", "--dtype", "fp8"], "--dtype: unknown dtype 'fp8'"),
    ],
)
def test_synthetic_cli_names_bad_options(
    tmp_path: pathlib.Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(app, ["model", "synthetic", *args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "m").exists()
