"""YAML prompt templates: loading with located validation errors, and sandboxed rendering.

File format::

    key: sku                 # catalogue column identifying an item (default "sku")
    defaults:                # optional, applied to every template
      model: tiny            # null / absent means "the worker's configured default model"
      scheduler: euler_a
      steps: 20
      guidance: 7.0
      width: 512
      height: 512
      seeds: 4               # optional sweep size; the CLI --seeds overrides it
      negative_prompt: "lowres, blurry"
      preset: photo          # optional, see presets
      max_variants: 16       # cap on the variants one template may expand to
      when: null             # optional condition over catalogue fields
    presets:                 # optional; the prompt formula: style tags, subject, scene
      photo:
        before: "best quality, {product photo|studio photo}"   # quality and style tags
        after: "soft light"                                    # scene details
        negative_prompt: "text, watermark"
    templates:
      studio:
        prompt: "{{ colour }} {{ title }}, {white|grey} background"
        when: "category == 'mugs' and price|float > 20"
        steps: 25            # any default may be overridden per template
      on_table:
        kind: img2img        # txt2img (default), img2img, inpaint or controlnet
        image: photo         # the catalogue column holding the product image
        strength: 0.6
        prompt: "{{ title }} on an oak table"

Job kinds, the catalogue image, masks, ControlNet and LoRA/embedding adapters are described
in producer.conditioning; few-step sampling (``sampling: lcm``, ``turbo``, ...) and the fast
path (``fast_path: {compile: ..., deepcache: 3}``) in producer.templates.few_step; FLUX.1's
true CFG (``true_cfg: 4``, which lets a FLUX.1 template have a negative prompt) and the model
families' rules (checked at load where the model is a diffusers folder on this machine) in
producer.templates.families; all may be set in ``defaults`` too.

Final prompt = before, prompt, after (joined with ", ", empty parts skipped); final
negative = preset negative_prompt, template negative_prompt.  Variant syntax ({a|b},
__wildcard__, see producer.variants) is expanded once at load over all these parts jointly;
wildcards are read from the ``wildcards/`` folder next to the template file.

The package: :mod:`producer.templates.loader` reads and checks a file,
:mod:`producer.templates.model` is a loaded template (its variants compiled, rendered per
catalogue row) and :mod:`producer.templates.sandbox` the Jinja sandbox prompts render in.
"""

from producer.templates.loader import (
    BUILTIN_DEFAULTS,
    MODEL_LENGTH,
    TEMPLATE_NAME_LENGTH,
    TemplateError,
    load_templates,
)
from producer.templates.model import RenderedPrompt, RenderError, Template, TemplateFile
from producer.templates.sandbox import MAX_PROMPT_CHARS

__all__ = [
    "BUILTIN_DEFAULTS",
    "MAX_PROMPT_CHARS",
    "MODEL_LENGTH",
    "TEMPLATE_NAME_LENGTH",
    "RenderError",
    "RenderedPrompt",
    "Template",
    "TemplateError",
    "TemplateFile",
    "load_templates",
]
