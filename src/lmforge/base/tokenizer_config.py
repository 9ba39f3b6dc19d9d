"""What a Hugging Face tokenizer folder says beside its tokenizer.json: named special tokens,
whether a BOS/EOS is added to every text, the chat template, and the generation stop ids.

A tokenizer folder (a transformers model, an imported checkpoint, a prepared data folder) may
hold, beside `tokenizer.json`:

- `tokenizer_config.json`: `bos_token`, `eos_token`, `pad_token`, `unk_token`, `cls_token`,
  `sep_token`, `mask_token` (each a string or an AddedToken object `{"content": ...}`),
  `add_bos_token` / `add_eos_token`, `chat_template` (a string, or a list of
  `{"name", "template"}` of which "default" is used), `tokenizer_class`;
- `chat_template.jinja`: the chat template as transformers 5 saves it (it wins over the key);
- `special_tokens_map.json`: the named tokens again, for folders whose config lacks them;
- `generation_config.json`: `eos_token_id` (a number or a list), the ids that end a reply.

`tokenizer_settings(path)` reads them into one `TokenizerSettings`, each bad value a ValueError
naming the file and key. Whether a BOS or EOS is added to every text comes from
`add_bos_token` / `add_eos_token` when the config says, else from the tokenizer.json's own
post-processor template, as transformers decides it. `encode_text` then gives the ids
`AutoTokenizer(text)["input_ids"]` gives, with `as_transformers_builds` (which `load_tokenizer`
applies) making a Llama tokenizer's text pipeline the one transformers 5 builds. `settings_file_dict` is what a copy of the folder
keeps (the template folded in), so one tokenizer_config.json carries everything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIALS_MAP_FILE = "special_tokens_map.json"
GENERATION_FILE = "generation_config.json"
TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


@dataclass(frozen=True)
class TokenizerSettings:
    """The tokenizer folder's settings (all None / empty for a plain lmforge tokenizer)."""

    tokens: dict[str, str] = field(default_factory=dict)
    """Named special tokens that are set: "bos_token" -> "<s>", ..."""
    add_bos: bool | None = None
    """Whether every text starts with the BOS token (None: the folder does not say)."""
    add_eos: bool | None = None
    chat_template: str | None = None
    template_source: str | None = None
    """The file the chat template was read from, for messages."""
    generation_eos_ids: tuple[int, ...] = ()
    """generation_config.json's eos_token_id(s)."""
    tokenizer_class: str | None = None
    config: dict = field(default_factory=dict)
    """tokenizer_config.json as read (other keys a template may use)."""


def settings_folder(path: Path) -> Path:
    """The folder holding the tokenizer files: `path` itself, or the folder of a tokenizer.json."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def read_json_object(file: Path) -> dict:
    """The JSON object in `file`, or a ValueError naming the file and what is wrong."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, found a {type(data).__name__}")
    return data


def token_text(value: object, file: Path, key: str) -> str | None:
    """A special token given as a string or an AddedToken object ({"content": ...}); None if unset."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{file}: {key!r} must be a token string or an object with a \"content\" string")
    return value


def _chat_template(config: dict, file: Path) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        chosen = named.get("default")
        if isinstance(chosen, str):
            return chosen
    raise ValueError(f"{file}: 'chat_template' must be a string or a list of {{\"name\", \"template\"}} "
                     f"objects with one named \"default\"")


def _flag(config: dict, key: str, file: Path) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{file}: {key!r} must be true or false, got {value!r}")
    return value


def _generation_eos(folder: Path) -> tuple[int, ...]:
    file = folder / GENERATION_FILE
    if not file.is_file():
        return ()
    value = read_json_object(file).get("eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{file}: 'eos_token_id' must be a token id or a list of them, got {value!r}")
    return tuple(values)


def tokenizer_settings(path: Path) -> TokenizerSettings:
    """The settings of the tokenizer folder `path` (or of the folder of the tokenizer.json `path`)."""
    folder = settings_folder(path)
    config_file = folder / CONFIG_FILE
    config = read_json_object(config_file) if config_file.is_file() else {}
    tokens: dict[str, str] = {}
    map_file = folder / SPECIALS_MAP_FILE
    if map_file.is_file():
        specials_map = read_json_object(map_file)
        tokens.update({k: t for k in TOKEN_KEYS if (t := token_text(specials_map.get(k), map_file, k))})
    for key in TOKEN_KEYS:
        if key in config:  # the config wins; null unsets a token the map names
            tokens.pop(key, None)
            if (text := token_text(config[key], config_file, key)) is not None:
                tokens[key] = text
    template, source = _chat_template(config, config_file), str(config_file)
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        try:
            template, source = jinja.read_text(encoding="utf-8"), str(jinja)
        except UnicodeDecodeError as err:
            raise ValueError(f"{jinja}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    tok_class = config.get("tokenizer_class")
    return TokenizerSettings(
        tokens=tokens, add_bos=_flag(config, "add_bos_token", config_file),
        add_eos=_flag(config, "add_eos_token", config_file), chat_template=template,
        template_source=source if template is not None else None,
        generation_eos_ids=_generation_eos(folder),
        tokenizer_class=tok_class if isinstance(tok_class, str) else None, config=config)


LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def as_transformers_builds(tok: Tokenizer, settings: TokenizerSettings) -> Tokenizer:
    """The tokenizer transformers 5 makes of this file: for a Llama tokenizer (tokenizer_class
    LlamaTokenizer, a BPE model) it keeps the vocabulary, merges and post-processor but sets its
    own text pipeline (no normalizer; a "▁" Metaspace that prepends to the first piece only, or
    to every piece when `legacy` is true), which differs from the older Prepend/Replace
    normalizer of Llama 2 and Mistral files after special tokens and on leading spaces. Any
    other tokenizer is returned as it is."""
    if settings.tokenizer_class not in LLAMA_CLASSES or not isinstance(tok.model, models.BPE):
        return tok
    add_prefix_space = settings.config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if settings.config.get("legacy") is True else "first") if add_prefix_space else "never"
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else []))
    return tok


def template_specials(tok: Tokenizer) -> tuple[int | None, int | None]:
    """(id before the text, id after it) that the tokenizer.json's post-processor template adds to
    a single text: a Llama tokenizer's <s>, None where it adds nothing."""
    post = json.loads(tok.to_str()).get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            at = next((i for i, piece in enumerate(single) if "Sequence" in piece), None)
            if at is None:
                return None, None
            names = [p.get("SpecialToken", {}).get("id") for p in single]
            before = [n for n in names[:at] if n]
            after = [n for n in names[at + 1:] if n]
            first = tok.token_to_id(before[0]) if before else None
            last = tok.token_to_id(after[-1]) if after else None
            return first, last
    return None, None


def added_ids(tok: Tokenizer, settings: TokenizerSettings) -> tuple[int | None, int | None]:
    """(bos id or None, eos id or None) added to every text, as transformers adds them."""
    from_template = template_specials(tok)
    bos = eos = None
    if settings.add_bos is None:
        bos = from_template[0]
    elif settings.add_bos and "bos_token" in settings.tokens:
        bos = tok.token_to_id(settings.tokens["bos_token"])
    if settings.add_eos is None:
        eos = from_template[1]
    elif settings.add_eos and "eos_token" in settings.tokens:
        eos = tok.token_to_id(settings.tokens["eos_token"])
    return bos, eos


def encode_text(tok: Tokenizer, text: str, settings: TokenizerSettings, *,
                add_special_tokens: bool = True) -> list[int]:
    """The ids of `text` as `AutoTokenizer` gives them: the text's tokens (special-token text is
    parsed as the special token, as transformers does), with the BOS/EOS the folder adds."""
    ids = tok.encode(text, add_special_tokens=False).ids
    if not add_special_tokens:
        return ids
    bos, eos = added_ids(tok, settings)
    return ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])


def settings_file_dict(path: Path, tok: Tokenizer | None = None) -> dict | None:
    """tokenizer_config.json for a copy of the folder `path`: the original keys, the chat template
    folded in (from chat_template.jinja too), and add_bos_token / add_eos_token made explicit
    from the tokenizer.json's post-processor (which lmforge's copy drops). None when the folder
    has no settings at all."""
    settings = tokenizer_settings(path)
    if not settings.config and not settings.tokens and settings.chat_template is None:
        return None
    out = dict(settings.config)
    out.update(settings.tokens)
    if settings.chat_template is not None:
        out["chat_template"] = settings.chat_template
    if tok is not None:
        bos, eos = added_ids(tok, settings)
        out.setdefault("add_bos_token", bos is not None)
        out.setdefault("add_eos_token", eos is not None)
    return out


def settings_files(folder: Path) -> list[Path]:
    """The settings files `folder` holds (tokenizer_config.json, generation_config.json,
    special_tokens_map.json): what a checkpoint keeps beside its tokenizer.json."""
    return [Path(folder) / name for name in (CONFIG_FILE, GENERATION_FILE, SPECIALS_MAP_FILE)
            if (Path(folder) / name).is_file()]


def write_settings(src: Path, out_folder: Path, tok: Tokenizer | None = None) -> Path | None:
    """Write `settings_file_dict(src)` as `out_folder/tokenizer_config.json` (and copy
    generation_config.json); the path written, or None when `src` has no settings."""
    data = settings_file_dict(src, tok)
    if data is None:
        return None
    out = Path(out_folder) / CONFIG_FILE
    out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    generation = settings_folder(src) / GENERATION_FILE
    if generation.is_file():
        (Path(out_folder) / GENERATION_FILE).write_bytes(generation.read_bytes())
    return out
