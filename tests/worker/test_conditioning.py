"""Job kinds: input preparation (fit, masks, canny) and rendering img2img, inpaint and
controlnet through pipelines made from the cached base pipeline."""

from __future__ import annotations

import dataclasses
import io
import pathlib
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from db.job_options import ControlNetSpec, JobOptions, MaskSpec
from worker.conditioning import (
    ConditioningError,
    PreparedInputs,
    build_mask,
    canny_image,
    check_controlnet,
    decode_image,
    fit_image,
    fitted_rgb,
    keep_masked,
    kind_pipeline,
    mask_overlay,
    prepare_inputs,
)
from worker.loading import NULL_MODEL, PipelineCache, load_pipeline
from worker.pipeline import RenderParams, check_inputs, render_batch

CPU = torch.device("cpu")
W, H = 64, 48  # not square: sizes are checked both ways
BASE = RenderParams(
    prompt="a red sneaker on a marble table",
    negative_prompt="blurry",
    steps=3,
    guidance=6.0,
    width=W,
    height=H,
)


def product_photo(size: tuple[int, int] = (120, 90)) -> PIL.Image.Image:
    """An RGBA cut-out: a textured product on a transparent background."""
    width, height = size
    rng = np.random.default_rng(0)
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[..., :3] = rng.integers(0, 256, (height, width, 3))
    # The product: an opaque rectangle in the middle third, sharp-edged.
    pixels[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3, 3] = 255
    return PIL.Image.fromarray(pixels)


def _array(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def cache() -> PipelineCache:
    return PipelineCache(device=CPU, max_models=2)


@pytest.fixture(scope="module")
def sd_pipe(cache: PipelineCache, tiny_model_dir: pathlib.Path) -> Any:
    return cache.get(str(tiny_model_dir))


@pytest.fixture(scope="module")
def sdxl_pipe(cache: PipelineCache, tiny_sdxl_model_dir: pathlib.Path) -> Any:
    return cache.get(str(tiny_sdxl_model_dir))


def _params(kind: str, options: JobOptions, image: PIL.Image.Image, **changes: Any) -> RenderParams:
    prepared = prepare_inputs(kind, options, image=image, mask=None, width=W, height=H)
    return dataclasses.replace(
        BASE,
        kind=kind,
        init_image=prepared.init_image,
        mask_image=prepared.mask_image,
        overlay=prepared.overlay,
        control_image=prepared.control_image,
        strength=prepared.strength,
        **changes,
    )


# --- inputs -----------------------------------------------------------------------------------


def test_fit_crops_the_centre_and_resizes() -> None:
    # A 200x100 image with red and blue strips at its sides: fitted to 64x64 the centre
    # square is kept, so neither colour survives.
    image = PIL.Image.new("RGB", (200, 100), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 30, 100))
    image.paste((0, 0, 255), (170, 0, 200, 100))
    fitted = fit_image(image, 64, 64)
    assert fitted.size == (64, 64)
    assert (np.asarray(fitted) == (0, 255, 0)).all()
    # The same aspect ratio: only resized.
    assert fit_image(image, 64, 32).getpixel((0, 0)) == (255, 0, 0)


def test_transparent_parts_become_white() -> None:
    photo = product_photo()
    fitted = fitted_rgb(photo, W, H)
    assert fitted.mode == "RGB" and fitted.size == (W, H)
    assert fitted.getpixel((0, 0)) == (255, 255, 255)
    # Opaque pixels are the photo's own, fitted.
    expected = fit_image(photo, W, H).convert("RGB").getpixel((W // 2, H // 2))
    assert fitted.getpixel((W // 2, H // 2)) == expected


def test_alpha_mask_keeps_the_opaque_pixels() -> None:
    mask = build_mask(MaskSpec(source="alpha"), image=product_photo(), mask=None, width=W, height=H)
    assert mask.mode == "L" and mask.size == (W, H)
    values = np.asarray(mask)
    assert set(np.unique(values)) == {0, 255}  # binary: the composite is exact
    assert values[H // 2, W // 2] == 0  # the product is kept
    assert values[0, 0] == 255  # the background is generated
    kept = np.argwhere(values == 0)
    # The kept region is the product's middle third (soft resized edges are regenerated).
    assert kept[:, 0].min() >= H // 3 - 1 and kept[:, 0].max() <= 2 * H // 3
    assert kept[:, 1].min() >= W // 3 - 1 and kept[:, 1].max() <= 2 * W // 3


def test_alpha_mask_needs_transparency() -> None:
    with pytest.raises(ConditioningError, match="source 'alpha' needs an input image with"):
        build_mask(
            MaskSpec(source="alpha"),
            image=PIL.Image.new("RGB", (80, 60)),
            mask=None,
            width=W,
            height=H,
        )


def test_column_mask_is_fitted_like_the_image_and_binarised() -> None:
    image = PIL.Image.new("RGB", (128, 96))
    mask = PIL.Image.new("L", (128, 96), 0)
    mask.paste(200, (0, 0, 64, 96))  # left half generated (>= 128 counts as white)
    fitted = np.asarray(
        build_mask(MaskSpec(source="column"), image=image, mask=mask, width=W, height=H)
    )
    assert fitted.shape == (H, W)
    assert set(np.unique(fitted)) == {0, 255}
    assert (fitted[:, : W // 2 - 1] == 255).all()
    assert (fitted[:, W // 2 + 1 :] == 0).all()


def test_column_mask_of_another_size_is_a_clear_error() -> None:
    with pytest.raises(ConditioningError, match=r"mask image is 100x96, the input image 128x96"):
        build_mask(
            MaskSpec(source="column"),
            image=PIL.Image.new("RGB", (128, 96)),
            mask=PIL.Image.new("L", (100, 96)),
            width=W,
            height=H,
        )


def test_box_mask_keeps_the_box() -> None:
    spec = MaskSpec(source="box", keep_box=(10, 5, 30, 20))
    values = np.asarray(
        build_mask(spec, image=PIL.Image.new("RGB", (9, 9)), mask=None, width=W, height=H)
    )
    assert (values[5:20, 10:30] == 0).all()
    assert np.count_nonzero(values == 0) == 20 * 15
    with pytest.raises(ConditioningError, match=r"keep_box \[10, 5, 70, 20\] is not a box inside"):
        build_mask(
            MaskSpec(source="box", keep_box=(10, 5, 70, 20)),
            image=PIL.Image.new("RGB", (9, 9)),
            mask=None,
            width=W,
            height=H,
        )


def test_keep_masked_pastes_the_overlay_by_its_alpha() -> None:
    generated = PIL.Image.new("RGB", (4, 1), (0, 0, 0))
    overlay = PIL.Image.new("RGBA", (4, 1), (200, 100, 50, 255))
    overlay.putpixel((1, 0), (200, 100, 50, 0))
    overlay.putpixel((2, 0), (200, 100, 50, 128))
    result = _array(keep_masked(generated, overlay))[0]
    assert result[0].tolist() == [200, 100, 50]  # opaque: the product exactly
    assert result[1].tolist() == [0, 0, 0]  # transparent: the generated pixel
    assert np.allclose(result[2], [100, 50, 25], atol=1)  # a soft edge blends the two
    # A binary mask as an overlay: the input where the mask is black.
    init = PIL.Image.new("RGB", (4, 1), (9, 9, 9))
    mask = PIL.Image.new("L", (4, 1), 255)
    mask.putpixel((3, 0), 0)
    masked = _array(keep_masked(generated, mask_overlay(init, mask)))[0]
    assert masked.tolist() == [[0, 0, 0]] * 3 + [[9, 9, 9]]


def test_canny_is_a_three_channel_edge_image() -> None:
    image = PIL.Image.new("RGB", (W, H), (0, 0, 0))
    image.paste((255, 255, 255), (20, 10, 40, 30))
    edges = canny_image(image, 100, 200)
    assert edges.mode == "RGB" and edges.size == (W, H)
    values = np.asarray(edges)
    assert set(np.unique(values)) == {0, 255}
    assert (values[..., 0] == values[..., 1]).all() and (values[..., 1] == values[..., 2]).all()
    assert values[10, 25, 0] == 255 or values[9, 25, 0] == 255  # the top edge
    assert values[20, 30, 0] == 0  # inside: no edge
    # Thresholds above the contrast find nothing.
    faint = PIL.Image.new("RGB", (W, H), (0, 0, 0))
    faint.paste((20, 20, 20), (20, 10, 40, 30))
    assert not np.asarray(canny_image(faint, 100, 200)).any()


def test_prepare_inputs_per_kind() -> None:
    photo = product_photo()
    assert prepare_inputs("txt2img", JobOptions(), image=None, mask=None, width=W, height=H) == (
        PreparedInputs()
    )
    img2img = prepare_inputs("img2img", JobOptions(), image=photo, mask=None, width=W, height=H)
    assert img2img.strength == 0.8  # diffusers' default
    assert img2img.init_image is not None and img2img.init_image.size == (W, H)
    inpaint = prepare_inputs(
        "inpaint",
        JobOptions(mask=MaskSpec(source="alpha"), strength=0.9),
        image=photo,
        mask=None,
        width=W,
        height=H,
    )
    assert inpaint.strength == 0.9 and inpaint.mask_image is not None
    # Alpha masks paste the fitted cut-out back by its own alpha.
    assert inpaint.overlay == fit_image(photo, W, H)
    control = prepare_inputs(
        "controlnet",
        JobOptions(controlnet=ControlNetSpec(model="cn", conditioning="image")),
        image=photo,
        mask=None,
        width=W,
        height=H,
    )
    assert control.control_image == fitted_rgb(photo, W, H)


@pytest.mark.parametrize(
    ("kind", "options", "image", "message"),
    [
        ("img2img", JobOptions(), None, "kind 'img2img' needs an input image"),
        ("inpaint", JobOptions(), "photo", "an inpaint job needs a mask"),
        ("controlnet", JobOptions(), "photo", "a controlnet job needs a ControlNet model"),
        ("outpaint", JobOptions(), "photo", "unknown job kind 'outpaint'"),
    ],
)
def test_prepare_inputs_errors(
    kind: str, options: JobOptions, image: str | None, message: str
) -> None:
    photo = product_photo() if image else None
    with pytest.raises(ConditioningError, match=message):
        prepare_inputs(kind, options, image=photo, mask=None, width=W, height=H)


def test_decoded_images_are_upright_by_their_exif_orientation() -> None:
    # Stored 40x20 with a green top-left pixel, tagged "turn 90 degrees clockwise" (6):
    # shown 20x40 with that pixel top-right, transparency kept.
    stored = PIL.Image.new("RGBA", (40, 20), (255, 0, 0, 128))
    stored.putpixel((0, 0), (0, 255, 0, 255))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    image = decode_image(buffer.getvalue(), what="input image")
    assert (image.size, image.mode) == ((20, 40), "RGBA")
    assert image.getpixel((19, 0)) == (0, 255, 0, 255)
    assert image.getpixel((0, 0)) == (255, 0, 0, 128)


def test_decode_errors_name_the_image() -> None:
    with pytest.raises(ConditioningError, match="input image abc: not a readable image"):
        decode_image(b"<html>not an image</html>", what="input image abc")


def test_check_inputs_per_kind() -> None:
    photo = product_photo()
    img2img = _params("img2img", JobOptions(strength=0.5), photo)
    check_inputs(img2img)
    with pytest.raises(ValueError, match=r"steps x strength must be at least 1 \(got 3 x 0\.2\)"):
        check_inputs(dataclasses.replace(img2img, strength=0.2))
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
        check_inputs(dataclasses.replace(img2img, strength=None))
    with pytest.raises(ValueError, match="init_image must be a RGB image of 64x48, got RGB 64x64"):
        check_inputs(dataclasses.replace(img2img, init_image=PIL.Image.new("RGB", (64, 64))))
    with pytest.raises(ValueError, match="mask_image is required for a inpaint job"):
        check_inputs(dataclasses.replace(img2img, kind="inpaint"))
    with pytest.raises(ValueError, match="control_image is required"):
        check_inputs(dataclasses.replace(BASE, kind="controlnet"))
    with pytest.raises(ValueError, match="unknown job kind 'sketch'"):
        check_inputs(dataclasses.replace(BASE, kind="sketch"))


# --- rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_img2img_renders_the_size_and_follows_the_image(
    arch: str, sd_pipe: Any, sdxl_pipe: Any
) -> None:
    pipe = sd_pipe if arch == "sd" else sdxl_pipe
    photo = product_photo()
    params = _params("img2img", JobOptions(strength=0.7), photo)  # 2 of the 3 steps
    images = render_batch(pipe, params, [1, 2])
    assert [image.seed for image in images] == [1, 2]
    assert all(image.image.size == (W, H) and image.image.mode == "RGB" for image in images)
    assert not np.array_equal(_array(images[0].image), _array(images[1].image))
    # Another input image, same seed: another result (the image is really used).
    other = _params("img2img", JobOptions(strength=0.7), PIL.Image.new("RGB", (120, 90), "navy"))
    assert not np.array_equal(
        _array(render_batch(pipe, other, [1])[0].image), _array(images[0].image)
    )
    # The strength reaches the pipeline (random weights: no "closer to the input" to test).
    gentle = render_batch(pipe, dataclasses.replace(params, strength=0.34), [1])[0].image  # 1
    assert not np.array_equal(_array(gentle), _array(images[0].image))


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_inpaint_keeps_the_products_pixels_exactly(arch: str, sd_pipe: Any, sdxl_pipe: Any) -> None:
    pipe = sd_pipe if arch == "sd" else sdxl_pipe
    params = _params("inpaint", JobOptions(mask=MaskSpec(source="alpha")), product_photo())
    assert params.strength == 1.0
    images = render_batch(pipe, params, [5, 6])
    init = _array(params.init_image)  # type: ignore[arg-type]
    keep = np.asarray(params.mask_image) == 0
    assert keep.sum() > 100
    alpha = np.asarray(params.overlay.getchannel("A"))  # type: ignore[union-attr]
    assert np.array_equal(keep, alpha == 255)  # the opaque pixels are the kept ones
    soft = (alpha > 0) & (alpha < 255)
    for image in images:
        assert image.image.size == (W, H)
        result = _array(image.image)
        assert np.array_equal(result[keep], init[keep])  # exactly the product
        assert not np.array_equal(result[~keep], init[~keep])  # a generated background
        # Soft edges lie between the product and the background: neither is pasted raw.
        assert soft.any() and not np.array_equal(result[soft], init[soft])
    assert not np.array_equal(_array(images[0].image), _array(images[1].image))


def test_inpaint_with_a_box(sd_pipe: Any) -> None:
    photo = PIL.Image.new("RGB", (W, H), (10, 200, 30))
    params = _params(
        "inpaint", JobOptions(mask=MaskSpec(source="box", keep_box=(8, 8, 24, 40))), photo
    )
    result = _array(render_batch(sd_pipe, params, [1])[0].image)
    assert (result[8:40, 8:24] == (10, 200, 30)).all()
    assert not (result[:, 30:] == (10, 200, 30)).all()


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_controlnet_follows_the_control_image(
    arch: str,
    cache: PipelineCache,
    sd_pipe: Any,
    sdxl_pipe: Any,
    tiny_controlnet_dir: pathlib.Path,
    tiny_sdxl_controlnet_dir: pathlib.Path,
) -> None:
    pipe = sd_pipe if arch == "sd" else sdxl_pipe
    controlnet = cache.controlnet(
        str(tiny_controlnet_dir if arch == "sd" else tiny_sdxl_controlnet_dir)
    )
    assert (
        cache.controlnet(str(tiny_controlnet_dir if arch == "sd" else tiny_sdxl_controlnet_dir))
        is controlnet
    )
    check_controlnet(pipe, controlnet)
    photo = product_photo()
    spec = ControlNetSpec(model="cn", low_threshold=50, high_threshold=150)
    params = _params("controlnet", JobOptions(controlnet=spec), photo, controlnet=controlnet)
    assert np.asarray(params.control_image).max() == 255  # the photo has edges
    images = render_batch(pipe, params, [1, 2])
    assert all(image.image.size == (W, H) for image in images)
    # Another control image (no edges at all), same seed: other pixels.
    blank = dataclasses.replace(params, control_image=PIL.Image.new("RGB", (W, H)))
    assert not np.array_equal(
        _array(render_batch(pipe, blank, [1])[0].image), _array(images[0].image)
    )
    # Scale 0 switches the ControlNet off: the control image no longer matters.
    off = dataclasses.replace(params, controlnet_scale=0.0)
    assert np.array_equal(
        _array(render_batch(pipe, off, [1])[0].image),
        _array(render_batch(pipe, dataclasses.replace(blank, controlnet_scale=0.0), [1])[0].image),
    )


def test_kinds_do_not_change_the_base_pipeline(
    sd_pipe: Any, tiny_controlnet_dir: pathlib.Path, cache: PipelineCache
) -> None:
    before = _array(render_batch(sd_pipe, BASE, [9])[0].image)
    photo = product_photo()
    controlnet = cache.controlnet(str(tiny_controlnet_dir))
    render_batch(sd_pipe, _params("img2img", JobOptions(), photo, scheduler="euler_a"), [1])
    render_batch(sd_pipe, _params("inpaint", JobOptions(mask=MaskSpec(source="alpha")), photo), [1])
    render_batch(
        sd_pipe,
        _params(
            "controlnet",
            JobOptions(controlnet=ControlNetSpec(model="cn")),
            photo,
            controlnet=controlnet,
        ),
        [1],
    )
    assert np.array_equal(_array(render_batch(sd_pipe, BASE, [9])[0].image), before)
    # The derived pipelines share the base's models: no weights were loaded or copied.
    derived = kind_pipeline(sd_pipe, "inpaint")
    assert derived.unet is sd_pipe.unet and derived.vae is sd_pipe.vae
    assert derived.text_encoder is sd_pipe.text_encoder
    assert derived.safety_checker is sd_pipe.safety_checker


def test_a_derived_pipeline_flags_without_blacking_out(sd_pipe: Any) -> None:
    params = _params("img2img", JobOptions(), product_photo())
    # The tiny checker's random weights never fire; the derived pipeline still runs it
    # (a verdict, not None) through pixelmill's keep-the-pixels wrapper.
    rendered = render_batch(sd_pipe, params, [1])[0]
    assert rendered.nsfw is False


def test_a_controlnet_for_another_base_model_is_refused(
    sdxl_pipe: Any, cache: PipelineCache, tiny_controlnet_dir: pathlib.Path
) -> None:
    with pytest.raises(ConditioningError, match="made for another base model"):
        check_controlnet(sdxl_pipe, cache.controlnet(str(tiny_controlnet_dir)))


def test_a_missing_controlnet_folder_is_a_clear_error(
    tmp_path: pathlib.Path, cache: PipelineCache
) -> None:
    with pytest.raises(FileNotFoundError, match="ControlNet folder not found"):
        cache.controlnet(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not a diffusers ControlNet folder"):
        cache.controlnet(str(tmp_path))


def test_the_null_model_renders_every_kind_at_size() -> None:
    pipe = load_pipeline(NULL_MODEL, device=CPU)
    photo = product_photo()
    params = _params("inpaint", JobOptions(mask=MaskSpec(source="alpha")), photo)
    image = _array(render_batch(pipe, params, [1])[0].image)
    alpha = np.asarray(params.overlay.getchannel("A"))  # type: ignore[union-attr]
    assert image.shape == (H, W, 3)
    init = _array(params.init_image)  # type: ignore[arg-type]
    assert np.array_equal(image[alpha == 255], init[alpha == 255])
    assert (image[alpha == 0] == 128).all()  # the null model's flat grey
