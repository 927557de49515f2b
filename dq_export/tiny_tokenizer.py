"""Build the small CLIP BPE vocabulary that tiny-sd ships with.

CLIP's real vocabulary (49,408 tokens) cannot be downloaded here, so tiny-sd carries its own:
every byte as a character token (so any prompt tokenizes), plus BPE merges that make each
word its captions use a single token. The files are in CLIPTokenizer's format, so the same loading code
serves tiny-sd and a real Stable Diffusion folder.

Regenerate the committed files with ``python -m dq_export.tiny_tokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "models" / "tiny-sd" / "tokenizer"
MAX_LENGTH = 32

WORDS = """
a an the of on in with and at by for to from its
zero one two three four five six seven eight nine
digit digits number numeral handwritten hand written drawn sketch sketched scribbled
ink pen pencil black white grey gray dark light bold thin thick small large big tiny
photo photograph picture image drawing painting illustration render close up view
cat dog horse bird fish cow sheep person man woman child people car bus train truck
boat plane bicycle street road city house building tree forest mountain river lake
sea beach sky cloud sunset sunrise night day snow rain field garden flower table
chair room kitchen window door food plate bowl cup fruit apple banana cake pizza
red green blue yellow orange purple brown old new wooden stone glass metal
sitting standing running walking flying lying parked
"""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character map (same as GPT-2's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Character tokens plus BPE merges learned on ``words`` until each word is one token.

    Merges are learned the usual way (most frequent adjacent pair first, ties by name), so
    applying them in rank order, as CLIPTokenizer does, turns every listed word into a
    single token.
    """
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    split = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for pieces in split:
            for pair in zip(pieces, pieces[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(" ".join(best))
        tokens.append("".join(best))
        split = [_merge_pair(pieces, best) for pieces in split]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _merge_pair(pieces: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            out.append(pieces[i] + pieces[i + 1])
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out


def write_tokenizer(out_dir: Path = TOKENIZER_DIR) -> None:
    vocab, merges = build_vocab_and_merges(WORDS.split())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
              "do_lower_case": True, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    write_tokenizer()
    print(f"wrote {TOKENIZER_DIR}")
