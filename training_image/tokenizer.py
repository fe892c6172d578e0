"""Byte-level BPE tokenizers (the `tokenizers` library), trained from text on the machine.

Byte-level means every string can be encoded, whatever its alphabet: the 256 byte symbols are
always in the vocabulary and merges are learned on top of them. Training is deterministic: the
same texts and vocabulary size give the same tokenizer.json.

A Hugging Face checkpoint brings its own tokenizer.json and tokenizer_config.json; the second says
where documents start and end (bos_token, add_bos_token, eos_token). `TextTokenizer` keeps both
files together, so every model directory and export carries the source's rules, and
`document_ids` applies them: BOS where the family puts it, EOS after every document.

A checkpoint's chat template travels the same way: transformers 5 writes it as chat_template.jinja
beside tokenizer_config.json (older checkpoints keep it in tokenizer_config.json's
`chat_template`); `TextTokenizer` reads either, writes chat_template.jinja, and renders
conversations with it (shared.conversations), or with DEFAULT_CHAT_TEMPLATE where there is none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shared.conversations import DEFAULT_CHAT_TEMPLATE, Message, assistant_mask, render, rendered_turns

END_OF_TEXT = "<|endoftext|>"  # separates documents in packed windows; id 0


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with at most `vocab_size` tokens (fewer if the texts run out of merges)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + end of text), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


TOKENIZER_CONFIG, GENERATION_CONFIG, CHAT_TEMPLATE = "tokenizer_config.json", "generation_config.json", "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TextTokenizer:
    """A `tokenizers.Tokenizer` with its tokenizer_config.json, and the source's
    generation_config.json when it had one (both travel with the model); otherwise used as the
    Tokenizer is."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any] | None = None, generation: dict[str, Any] | None = None,
                 chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.config = dict(config) if config is not None else own_tokenizer_config()
        self.generation = dict(generation) if generation else None
        # The template of chat_template.jinja wins over an older copy in tokenizer_config.json,
        # as in transformers; a named set of templates (a list) keeps its "default".
        template = chat_template if chat_template is not None else self.config.pop("chat_template", None)
        if isinstance(template, list):
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        self.config.pop("chat_template", None)
        self.chat_template: str | None = template if isinstance(template, str) and template.strip() else None
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        if self.eos_id is None:
            raise ValueError(f"the tokenizer has no end-of-document token: {TOKENIZER_CONFIG} names no eos_token it knows")

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def _special_id(self, key: str) -> int | None:
        token = self.config.get(key)
        if isinstance(token, dict):  # an AddedToken written out: {"content": ..., ...}
            token = token.get("content")
        return self.tokenizer.token_to_id(token) if isinstance(token, str) else None

    def save(self, path: str | Path) -> None:
        """tokenizer.json at `path`, tokenizer_config.json (and generation_config.json and
        chat_template.jinja) beside it."""
        self.tokenizer.save(str(path))
        Path(path).with_name(TOKENIZER_CONFIG).write_text(json.dumps(self.config, indent=2))
        if self.chat_template is not None:
            Path(path).with_name(CHAT_TEMPLATE).write_text(self.chat_template, encoding="utf-8")
        if self.generation is not None:
            Path(path).with_name(GENERATION_CONFIG).write_text(json.dumps(self.generation, indent=2))

    def document_ids(self, texts: list[str]) -> list[list[int]]:
        """The tokens of each document as the family trains on it: BOS first where it has one and
        adds it (add_bos_token, else what tokenizer.json's post-processor does), EOS last."""
        add_bos = self.config.get("add_bos_token")
        documents = []
        for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=add_bos is not False):
            ids = encoding.ids
            if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
                ids.insert(0, self.bos_id)
            if ids[-1:] != [self.eos_id]:
                ids.append(self.eos_id)
            documents.append(ids)
        return documents

    @property
    def starts_with_bos(self) -> bool:
        """Whether the family begins each document with BOS: add_bos_token when the config says,
        else what tokenizer.json's post-processor does."""
        add_bos = self.config.get("add_bos_token")
        if self.bos_id is None or add_bos is False:
            return False
        return bool(add_bos) or self.tokenizer.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    def piece_ids(self, texts: list[str], starts: list[bool], ends: list[bool]) -> list[list[int]]:
        """The tokens of pieces of documents (a long document comes in several): BOS before a
        piece that starts a document where the family puts one, EOS after one that ends it, as
        document_ids does for whole documents."""
        bos = self.starts_with_bos
        out = []
        for encoding, start, end in zip(self.tokenizer.encode_batch_fast(texts, add_special_tokens=False), starts, ends):
            ids = encoding.ids
            if start and bos:
                ids.insert(0, self.bos_id)
            if end:
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def special_token(self, key: str) -> str | None:
        token = self.config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return token if isinstance(token, str) else None

    def special_id(self, key: str) -> int | None:
        """The id of a special token tokenizer_config.json names (bos_token, pad_token, ...)."""
        return self._special_id(key)

    @property
    def template(self) -> str:
        """The chat template conversations are rendered with: the model's, or the default."""
        return self.chat_template or DEFAULT_CHAT_TEMPLATE

    def _template_tokens(self) -> dict[str, str | None]:
        return {key: self.special_token(key) for key in SPECIAL_TOKENS}

    def conversation_ids(self, messages: list[Message]) -> tuple[list[int], list[bool]]:
        """A conversation's tokens as rendered by the chat template, and for each whether it is
        the assistant's (the tokens the loss is on). The template places any BOS itself, as
        transformers' apply_chat_template does (no special tokens are added)."""
        text, spans = rendered_turns(self.template, messages, self._template_tokens())
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, assistant_mask(encoding.offsets, spans)

    def chat_prompt_ids(self, messages: list[Message]) -> list[int]:
        """The tokens generation continues from to answer a conversation: it rendered with the
        template's generation prompt (the assistant's turn header)."""
        text = render(self.template, messages, self._template_tokens(), add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, text: str) -> list[int]:
        """The tokens generation continues from: the document's, without the EOS that would end it."""
        return self.document_ids([text])[0][:-1]


def own_tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json of the tokenizers trained here, so transformers loads them too."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": END_OF_TEXT,
            "add_bos_token": False, "add_eos_token": False}


def as_text_tokenizer(tokenizer: Tokenizer | TextTokenizer) -> TextTokenizer:
    return tokenizer if isinstance(tokenizer, TextTokenizer) else TextTokenizer(tokenizer)


def end_of_text_id(tokenizer: Tokenizer | TextTokenizer) -> int:
    """The token that ends every document."""
    return as_text_tokenizer(tokenizer).eos_id


def document_ids(tokenizer: Tokenizer | TextTokenizer, texts: list[str]) -> list[list[int]]:
    return as_text_tokenizer(tokenizer).document_ids(texts)


def save_tokenizer(tokenizer: Tokenizer | TextTokenizer, path: str | Path) -> None:
    tokenizer.save(str(path))


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """tokenizer.json, with the tokenizer_config.json, generation_config.json and
    chat_template.jinja beside it when there are."""
    beside = {name: Path(path).with_name(name) for name in (TOKENIZER_CONFIG, GENERATION_CONFIG)}
    config, generation = (json.loads(p.read_text()) if p.is_file() else None for p in beside.values())
    return TextTokenizer(Tokenizer.from_file(str(path)), config, generation, read_chat_template(Path(path).parent))


def read_chat_template(folder: Path) -> str | None:
    """chat_template.jinja of a folder, None where it has none."""
    file = folder / CHAT_TEMPLATE
    return file.read_text(encoding="utf-8") if file.is_file() else None
