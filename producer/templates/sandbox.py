"""The Jinja sandbox prompts render in.

Templates are user content run for every catalogue row, so rendering one row must take time
and memory in proportion to the template and the row: no loops, macros or calls, a filter
allow-list, and every operation that can build a long text or a huge number bounded.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.filters
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox

# Rendered prompts longer than this are certainly a template bug (CLIP reads ~77 tokens).
MAX_PROMPT_CHARS = 2000
# Prompts only need simple text shaping.  Every other built-in filter is left out: some
# can allocate unbounded memory (center, indent, wordwrap with a huge width) and none are
# needed to write a prompt.  Unknown filters fail when the file is loaded.
_ALLOWED_FILTERS = (
    "capitalize",
    "d",
    "default",
    "first",
    "float",  # for `when` conditions such as "price|float > 20"
    "int",
    "join",
    "last",
    "length",
    "lower",
    "replace",
    "round",
    "string",
    "title",
    "trim",
    "truncate",
    "upper",
)

# A prompt never needs a text longer than the prompt limit, so an operation that builds one
# (``*``, ``+``, ``~``, ``replace``, ``join``) is refused before it allocates it: otherwise a
# few nested filters can build gigabytes before the rendered prompt's length is checked
# (``(title*100)|replace("", title*100)`` is 4 million characters).  An operation may still
# keep a longer catalogue field at its length, so "description|replace('\n', ' ')|
# truncate(300)" works on a long description.
_MAX_BUILT_CHARS = MAX_PROMPT_CHARS
# Numbers: "(2**64)**64" or a number squared again and again in "{% set %}"s grows without
# bound; no prompt needs more than a few digits.
_MAX_EXPONENT = 64
_MAX_INT_BITS = 4096


def _size(value: Any) -> int:
    """About how many characters ``value`` is as text: strings by length, lists by their items
    (a list of 2000 long strings is as big as their join); anything else counts as 1."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple):
        return len(value) + sum(map(_size, value))
    return 1


def _check_built(operation: str, size: int, *inputs: int) -> None:
    if size > max(_MAX_BUILT_CHARS, *inputs):
        raise jinja2.sandbox.SecurityError(
            f"{operation} would build a text of {size} characters (prompt limit {MAX_PROMPT_CHARS})"
        )


def _bounded_replace(s: Any, old: Any, new: Any, count: int | None = None) -> str:
    """Jinja's ``replace`` filter, refusing a result longer than the limit before building it."""
    text, old_text, new_text = str(s), str(old), str(new)
    found = text.count(old_text)  # "" is found between every two characters
    replaced = found if count is None or count < 0 else min(found, count)
    _check_built("replace", len(text) + replaced * (len(new_text) - len(old_text)), len(text))
    return text.replace(old_text, new_text, -1 if count is None else count)


@jinja2.pass_environment
def _bounded_join(
    environment: jinja2.Environment, value: Any, d: Any = "", attribute: Any = None
) -> str:
    """Jinja's ``join`` filter, refusing a result longer than the limit before building it."""
    if attribute is not None:
        value = map(jinja2.filters.make_attrgetter(environment, attribute), value)
    texts = [str(item) for item in value]
    separator = str(d)
    joined = sum(map(len, texts))
    _check_built("join", joined + len(separator) * max(len(texts) - 1, 0), joined)
    return separator.join(texts)


# The filters that can build a text longer than their input.
_BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "join": _bounded_join,
    "replace": _bounded_replace,
}


class NotAllowed(jinja2.TemplateSyntaxError):
    """A Jinja construct prompts may not use; raised when the template is parsed (loaded)."""


# Constructs that repeat work, the only way to make rendering one row slow (three nested
# loops over a 2000-character text are 8 billion steps; a macro calling itself twice per
# call doubles with every level).  Catalogue fields are single texts, so a prompt has nothing
# to loop over.  Other templates cannot be reached (there is no loader).
_NOT_ALLOWED: dict[type[jinja2.nodes.Node], str] = {
    jinja2.nodes.For: "'for' loops are not allowed in prompts (catalogue fields are single texts)",
    jinja2.nodes.Macro: "macros are not allowed in prompts",
    jinja2.nodes.CallBlock: "'call' blocks are not allowed in prompts",
    jinja2.nodes.Extends: "'extends' is not allowed in prompts",
    jinja2.nodes.Include: "'include' is not allowed in prompts",
    jinja2.nodes.Import: "'import' is not allowed in prompts",
    jinja2.nodes.FromImport: "'import' is not allowed in prompts",
}


class _PromptCodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles ``a ~ b`` to the sandbox's bounded concatenation: the plain one is a
    module-level function of Jinja's runtime, which a sandbox cannot intercept."""

    @jinja2.compiler.optimizeconst
    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _PromptSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox prompts render in.

    On top of Jinja's sandbox (no underscore attributes, no mutation of containers):
    no globals (``range``, ``cycler``, ``lipsum`` ... are not needed and would otherwise be
    reported as catalogue fields), a filter allow-list, no calls (string methods such as
    ``title.center(10**9)`` could exhaust memory; filters cover the legitimate uses), no
    loops or macros (refused when the template is parsed), and every operation that can
    build a long text or a huge number bounded.  Rendering one row therefore takes time
    and memory in proportion to the template and the row.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _PromptCodeGenerator

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, autoescape=False)
        self.globals.clear()
        self.filters = {
            name: _BOUNDED_FILTERS.get(name, self.filters[name]) for name in _ALLOWED_FILTERS
        }

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        for node in tree.find_all(tuple(_NOT_ALLOWED)):
            raise NotAllowed(_NOT_ALLOWED[type(node)], node.lineno, name, filename)
        return tree

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # A method cannot be called, and written out it would put its repr, with a memory
        # address that differs on every run, into the prompt and so into the dedupe key.
        return not callable(value) and super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> None:
        return None  # str.format is a method like any other (see is_safe_attribute)

    def is_safe_callable(self, obj: Any) -> bool:
        return False  # no globals, no macros: nothing a prompt calls is ours

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        # Same as the base class, but without putting the object's repr (with its memory
        # address) into the message.
        raise jinja2.sandbox.SecurityError(
            "calling functions or methods is not allowed in prompts (use filters)"
        )

    def bounded_concat(self, values: tuple[Any, ...]) -> str:
        """``a ~ b ~ ...``: each value as text, joined, refused past the limit."""
        texts = [str(value) for value in values]
        _check_built("'~'", sum(map(len, texts)), *map(len, texts))
        return "".join(texts)

    def call_binop(self, context: jinja2.runtime.Context, op: str, left: Any, right: Any) -> Any:
        if op == "%" and isinstance(left, str):
            # "%0999999999d" % 1 is a gigabyte; prompts write "{{ a }}, {{ b }}" instead.
            raise jinja2.sandbox.SecurityError("'%' string formatting is not allowed in prompts")
        if op == "+" and isinstance(left, str | list | tuple):
            _check_built("'+'", _size(left) + _size(right), _size(left), _size(right))
        if op == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int):
                    _check_built("'*'", _size(seq) * count, _size(seq) if count <= 1 else 0)
        if op == "**" and isinstance(right, int | float) and abs(right) > _MAX_EXPONENT:
            raise jinja2.sandbox.SecurityError(f"exponent {right} is too large")
        if _is_int(left) and _is_int(right):
            bits = {"*": left.bit_length() + right.bit_length(), "**": left.bit_length() * right}
            if bits.get(op, 0) > _MAX_INT_BITS:
                raise jinja2.sandbox.SecurityError(f"the result of '{op}' is too large a number")
        binop: Callable[[Any, Any], Any] = {
            "*": operator.mul,
            "**": operator.pow,
            "+": operator.add,
            "%": operator.mod,
        }[op]
        return binop(left, right)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# One environment is shared: it holds no per-render state.
SANDBOX = _PromptSandbox()
