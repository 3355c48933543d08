"""Task prompts and instructions, applied alike in Python (inference, mining) and in TensorFlow (seqio).

A `Prompt` is two templates, one per tower, over these fields:

* query template: ``{text}`` (the query), ``{task}``, ``{instruction}`` (= ``query_instruction``);
* document template: ``{text}``, ``{title}`` (``empty_title`` when the document has none), ``{doc}`` (BEIR's
  ``(title + " " + text).strip()``), ``{task}``, ``{instruction}`` (= ``document_instruction``).

The result is stripped of surrounding whitespace (Python's ``str.strip``), so an empty instruction leaves no
stray space. Presets (`prompt_preset`):

=============  =========================================  ==================================================
name           query                                      document
=============  =========================================  ==================================================
``none``       ``{text}``                                 ``{doc}``
``e5``         ``query: {text}``                          ``passage: {doc}``
``gecko``      ``task: {task} | query: {text}``            ``title: {title} | text: {text}`` (title "none")
``instructor`` ``{instruction} {text}``                   ``{instruction} {doc}``
``qwen3``      ``Instruct: {task}\nQuery: {text}``        ``{doc}`` (Qwen3-Embedding; also E5-instruct)
=============  =========================================  ==================================================

EmbeddingGemma's prompts are ``gecko``'s (``task: search result | query: ...``, ``title: none | text: ...``).
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any

# Python's str.isspace() characters, as an RE2 class (TF's own strip is ASCII-only).
_PY_SPACE = (
    r"[\t\n\x0b\x0c\r\x{1c}-\x{1f} \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}"
    r"\x{3000}]"
)
_QUERY_FIELDS = frozenset({"text", "task", "instruction"})
_DOC_FIELDS = frozenset({"text", "title", "doc", "task", "instruction"})


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Query / document templates plus the values of ``{task}`` and the instructions."""

    query: str = "{text}"
    document: str = "{doc}"
    task: str = ""
    query_instruction: str = ""
    document_instruction: str = ""
    empty_title: str = ""

    def __post_init__(self) -> None:
        for name, tmpl, allowed in (
            ("query", self.query, _QUERY_FIELDS),
            ("document", self.document, _DOC_FIELDS),
        ):
            fields = _fields(tmpl)
            bad = sorted(set(fields) - allowed)
            if bad:
                raise ValueError(
                    f"prompt {name} template {tmpl!r}: unknown field(s) {bad}; allowed: {sorted(allowed)}"
                )
            if "task" in fields and not self.task:
                raise ValueError(
                    f"prompt {name} template {tmpl!r} uses {{task}} but no task description was given"
                )
        if "instruction" in _fields(self.query) and not self.query_instruction:
            raise ValueError(
                f"prompt query template {self.query!r} uses {{instruction}} but query_instruction is empty"
            )
        if "instruction" in _fields(self.document) and not self.document_instruction:
            raise ValueError(
                f"prompt document template {self.document!r} uses {{instruction}} "
                "but document_instruction is empty"
            )

    # ------------------------------------------------------------------------------------------------ Python
    def format_query(self, text: str) -> str:
        return self.query.format(text=text, task=self.task, instruction=self.query_instruction).strip()

    def format_document(self, text: str, title: str = "") -> str:
        return self.document.format(
            text=text,
            title=title or self.empty_title,
            doc=(title + " " + text).strip(),
            task=self.task,
            instruction=self.document_instruction,
        ).strip()

    # -------------------------------------------------------------------------------------------- TensorFlow
    def format_query_tf(self, text: Any) -> Any:
        """`format_query` on a string tensor (any shape)."""
        return _render_tf(
            self.query, {"text": text, "task": self.task, "instruction": self.query_instruction}
        )

    def format_document_tf(self, text: Any, title: Any = "") -> Any:
        """`format_document` on string tensors of the same shape (``title`` may be a Python string)."""
        import tensorflow as tf

        text = tf.convert_to_tensor(text, tf.string)
        title = tf.broadcast_to(tf.convert_to_tensor(title, tf.string), tf.shape(text))
        fields: dict[str, Any] = {"text": text, "task": self.task, "instruction": self.document_instruction}
        used = _fields(self.document)
        if "title" in used:
            fields["title"] = (
                tf.where(tf.equal(title, ""), tf.constant(self.empty_title), title)
                if self.empty_title
                else title
            )
        if "doc" in used:
            fields["doc"] = strip_tf(tf.strings.join([title, " ", text]))
        return _render_tf(self.document, fields)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def format(self, role: str, texts: list[str], titles: list[str] | None = None) -> list[str]:
        """`format_query` / `format_document` over a list (``role``: "query" or "document")."""
        if role == "query":
            if titles is not None:
                raise ValueError("titles are for documents; queries have none")
            return [self.format_query(t) for t in texts]
        if role != "document":
            raise ValueError(f"role must be 'query' or 'document', got {role!r}")
        if titles is not None and len(titles) != len(texts):
            raise ValueError(f"{len(titles)} titles for {len(texts)} documents")
        return [self.format_document(t, ti) for t, ti in zip(texts, titles or [""] * len(texts))]

    def prefix(self, role: str) -> str | None:
        """The role's template as a sentence-transformers prompt (a prefix of the text), or None when it has
        no prefix form. A document template's ``{title}`` is rendered untitled (``empty_title``): a
        sentence-transformers prompt never sees titles. ``""`` when the role has no prompt."""
        tmpl = self.query if role == "query" else self.document
        for field in ("{text}", "{doc}"):
            if tmpl.endswith(field) and field not in tmpl[: -len(field)]:
                head = tmpl[: -len(field)]
                fields = set(_fields(head))
                if fields - {"title", "task", "instruction"}:
                    return None
                return head.format(title=self.empty_title, task=self.task,
                                   instruction=self.query_instruction if role == "query"
                                   else self.document_instruction)
        return None


PRESETS = ("none", "e5", "gecko", "instructor", "qwen3")


def prompt_from_config(query_prompt: str = "", document_prompt: str = "") -> Prompt | None:
    """The one reading of a config's ``data.query_prompt`` / ``data.document_prompt``, used by the training
    data, the evaluators and both exports (sentence-transformers prompts, SavedModel signatures), so a model is
    evaluated and served on exactly the strings it was trained on.

    A plain prefix (``"query: "``) is prepended: ``prefix{text}`` for queries, ``prefix{doc}`` for documents
    (``{doc}`` = ``(title + " " + text).strip()``). A template (anything with ``{``) is used as it is, with
    the fields of `Prompt`. A document template that uses ``{title}`` renders an untitled document's title as
    ``none`` (Gecko's and EmbeddingGemma's ``title: none | text: ...``). None when neither is set."""
    if not (query_prompt or document_prompt):
        return None
    q = query_prompt if "{" in query_prompt else query_prompt + "{text}"
    d = document_prompt if "{" in document_prompt else document_prompt + "{doc}"
    return Prompt(q, d, empty_title="none" if "title" in _fields(d) else "")


def fill_instruction(template: str, instruction: str, field_names: tuple[str, ...] = ("task", "instruction")) -> str:
    """`template` with its ``{task}`` / ``{instruction}`` fields replaced by `instruction` (braces in it escaped),
    the other fields left in place: a task's own template in the same prompt language."""
    if not instruction:
        return template
    value = instruction.replace("{", "{{").replace("}", "}}")
    for name in field_names:
        template = re.sub(r"(?<!\{)\{" + name + r"\}(?!\})", lambda _m: value, template)
    return template


def task_prompt(query_prompt: str = "", document_prompt: str = "", instruction: str = "",
                document_instruction: str = "") -> Prompt | None:
    """The `Prompt` of one task: the config's templates (``data.query_prompt`` / ``data.document_prompt``, which
    may use ``{task}`` / ``{instruction}``) with the task's instruction filled in (Gecko's ``task: {task} |
    query: {text}``, E5-instruct's ``Instruct: {task}\nQuery: {text}``, INSTRUCTOR's ``{instruction} {text}``);
    the document side takes `document_instruction` for ``{instruction}`` and `instruction` for ``{task}``.
    Training renders each task's examples with its own instruction; evaluation and export use
    ``data.instruction`` (`config_prompt`)."""
    return prompt_from_config(*_filled(query_prompt, document_prompt, instruction, document_instruction))


def _filled(query_prompt: str, document_prompt: str, instruction: str, document_instruction: str
            ) -> tuple[str, str]:
    """The two templates with the instructions filled in (see `task_prompt`)."""
    q = fill_instruction(query_prompt, instruction)
    d = fill_instruction(fill_instruction(document_prompt, instruction, ("task",)), document_instruction,
                         ("instruction",))
    return q, d


def config_prompt(data_cfg: Any) -> Prompt | None:
    """The prompt a config evaluates and serves with: its templates with ``data.instruction`` (and
    ``data.document_instruction``) filled in."""
    return task_prompt(data_cfg.get("query_prompt", ""), data_cfg.get("document_prompt", ""),
                       data_cfg.get("instruction", ""), data_cfg.get("document_instruction", ""))


def config_prompt_strings(data_cfg: Any) -> tuple[str, str]:
    """(query, document) prompt strings of `config_prompt`, for APIs that take prompt strings (evaluators)."""
    return _filled(data_cfg.get("query_prompt", ""), data_cfg.get("document_prompt", ""),
                   data_cfg.get("instruction", ""), data_cfg.get("document_instruction", ""))


def prompt_from_st(prompts: dict[str, str] | None) -> Prompt | None:
    """The `Prompt` of a sentence-transformers folder's ``prompts`` (its "query" / "document" entries, or
    "passage" as E5 folders name documents); None when it has neither."""
    prompts = prompts or {}
    return prompt_from_config(prompts.get("query", ""), prompts.get("document", prompts.get("passage", "")))


def st_prompts(prompt: Prompt | None, existing: dict[str, str] | None = None) -> dict[str, str]:
    """A model's sentence-transformers ``prompts``: `existing` plus "query" / "document" from `prompt` where
    the template has a prefix form (`Prompt.prefix`); a warning names a role whose template has none."""
    out = dict(existing or {})
    if prompt is None:
        return out
    for role in ("query", "document"):
        prefix = prompt.prefix(role)
        if prefix is None:
            import logging
            logging.getLogger(__name__).warning(
                "the %s prompt template %r has no prefix form; it is not written to the sentence-transformers "
                "prompts (apply it yourself when encoding with sentence-transformers)", role,
                prompt.query if role == "query" else prompt.document)
        elif prefix:
            out.setdefault(role, prefix)
    return out


def prompt_preset(
    name: str, *, task: str = "", query_instruction: str = "", document_instruction: str = ""
) -> Prompt:
    """A named prompt style (see module docstring); ``gecko`` needs `task`, ``instructor`` instructions."""
    if name == "none":
        return Prompt()
    if name == "e5":
        return Prompt("query: {text}", "passage: {doc}")
    if name == "gecko":
        if not task:
            raise ValueError("the 'gecko' prompt needs a task description, e.g. task='search result'")
        return Prompt(
            "task: {task} | query: {text}", "title: {title} | text: {text}", task=task, empty_title="none"
        )
    if name == "qwen3":
        if not task:
            raise ValueError("the 'qwen3' prompt needs a task instruction, e.g. task='Given a web search query, "
                             "retrieve relevant passages that answer the query'")
        return Prompt("Instruct: {task}\nQuery: {text}", "{doc}", task=task)
    if name == "instructor":
        if not query_instruction or not document_instruction:
            raise ValueError(
                "the 'instructor' prompt needs query_instruction and document_instruction, e.g. "
                "'Represent the scientific claim for retrieving supporting abstracts:'"
            )
        return Prompt(
            "{instruction} {text}",
            "{instruction} {doc}",
            query_instruction=query_instruction,
            document_instruction=document_instruction,
        )
    raise ValueError(f"unknown prompt preset {name!r}; expected one of {PRESETS}")


def _fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"bad prompt template {template!r}: {e}") from None


def strip_tf(s: Any) -> Any:
    """Python ``str.strip()`` on a string tensor."""
    import tensorflow as tf

    return tf.strings.regex_replace(s, f"^{_PY_SPACE}+|{_PY_SPACE}+$", "")


def _render_tf(template: str, fields: dict[str, Any]) -> Any:
    import tensorflow as tf

    parts: list[Any] = []
    shape_of = None
    for literal, name, spec, conv in string.Formatter().parse(template):
        if literal:
            parts.append(literal)
        if name is not None:
            if spec or conv:
                raise ValueError(f"prompt template {template!r}: format specs are not supported")
            v = fields[name]
            if not isinstance(v, str):
                v = tf.convert_to_tensor(v, tf.string)
                shape_of = v if shape_of is None else shape_of
            parts.append(v)
    if shape_of is None:  # the template uses no tensor field: a constant
        return tf.constant("".join(p for p in parts if isinstance(p, str)).strip())
    parts = [tf.fill(tf.shape(shape_of), p) if isinstance(p, str) else p for p in parts]
    return strip_tf(tf.strings.join(parts))
