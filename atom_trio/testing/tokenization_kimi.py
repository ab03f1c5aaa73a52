"""A tokenizer in the layout of Kimi-K2's ``tokenization_kimi.py``, for tiny test checkpoints (`write_kimi_tokenizer`).

Not imported by atom_trio: it is copied into a checkpoint, where transformers runs it only with
``trust_remote_code``, as it runs Kimi's. Like Kimi's, it is a slow (Python) transformers tokenizer over
a ``tiktoken.Encoding``: byte-level BPE ranks in ``tiktoken.model``, Kimi's split pattern (Han characters
apart from other letters, words split at case changes), and a block of reserved special tokens right after
the ranks, named by ``added_tokens_decoder`` where the config names them.
"""

import base64

import tiktoken
from transformers import PreTrainedTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        (
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        ),
        (
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        ),
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
NUM_RESERVED_SPECIAL_TOKENS = 24  # Kimi-K2 reserves 256


def _read_ranks(path):
    """tiktoken's ``load_tiktoken_bpe``, minus its cache (keyed by path: a rewritten test file would read stale)."""
    with open(path, "rb") as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


class TikTokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, bos_token="[BOS]", eos_token="[EOS]", added_tokens_decoder=None, **kwargs):
        ranks = _read_ranks(vocab_file)
        named = {int(i): getattr(t, "content", t) for i, t in (added_tokens_decoder or {}).items()}
        reserved = range(len(ranks), len(ranks) + NUM_RESERVED_SPECIAL_TOKENS)
        self.special_tokens = {named.get(i, f"<|reserved_token_{i}|>"): i for i in reserved}
        self.vocab_file = vocab_file
        self.model = tiktoken.Encoding(
            name="tiny-kimi", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in byte_encoder.items()}
        self.decoder = {
            i: "".join(byte_encoder[b] for b in self.model.decode_single_token_bytes(i))
            for i in range(self.model.n_vocab)
        }
        self.encoder = {token: i for i, token in self.decoder.items()}
        super().__init__(
            bos_token=bos_token, eos_token=eos_token, added_tokens_decoder=added_tokens_decoder, **kwargs
        )

    @property
    def vocab_size(self):
        return self.model.n_vocab

    def get_vocab(self):
        return dict(self.encoder)

    def _tokenize(self, text, **kwargs):
        return [self.decoder[i] for i in self.model.encode(text, allowed_special="all")]

    def _convert_token_to_id(self, token):
        return self.encoder[token]

    def _convert_id_to_token(self, index):
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens):
        return bytes(self.byte_decoder[c] for c in "".join(tokens)).decode("utf-8", "replace")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return (self.vocab_file,)

    def apply_chat_template(self, conversation, tools=None, **kwargs):
        """Tool definitions with their keys sorted, at every depth, before the template renders them (Kimi-K2's)."""
        return super().apply_chat_template(conversation, tools=_sorted_keys(tools), **kwargs)


def _sorted_keys(value):
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value
