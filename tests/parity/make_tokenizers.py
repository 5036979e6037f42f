#!/usr/bin/env python3
"""Writes the tokenizer test data under tests/data/tokenizers/ with Hugging Face `tokenizers`.

No real DeepSeek tokenizer files are reachable here, so this trains small byte-level BPE
tokenizers with the pre-tokenizer configuration DeepSeek-V3 and DeepSeek-V2 publish in their
tokenizer.json (the Split regexes, then ByteLevel without its own regex), their special tokens
and their post-processor (the begin-of-sentence token before the text), on a small
multilingual corpus. Then it runs every string of a test corpus (multilingual text, CJK,
emoji and ZWJ sequences, code, whitespace runs, digits, special tokens, odd input) through
them and records what `tokenizers` produced: ids with and without special tokens, and the
decoded text with and without them. mlaserve's tokenizer must reproduce every one exactly.

    pip install tokenizers==0.23.3
    python3 tests/parity/make_tokenizers.py --out tests/data/tokenizers
"""
import argparse
import json
import os
import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# The Split patterns of DeepSeek-V3's tokenizer.json, in order.
V3_SPLITS = [
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]
# The Split patterns of DeepSeek-V2's (and DeepSeek LLM's) tokenizer.json, in order.
V2_SPLITS = [
    "[\r\n]",
    # Cased letters of many scripts (written with escapes where a character has a canonical
    # equivalent that editors may substitute).
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗ"
    "\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d"
    "\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184"
    "Ⰰ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
]

# Special tokens (added, never split or merged) beside BOS and EOS.
V3_SPECIAL = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜tool▁calls▁begin｜>",
              "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
              "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
              "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
V2_SPECIAL = ["<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<|EOT|>"]

TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. Multi-head latent attention caches one
compressed latent per token per layer instead of per-head keys and values. Serving
DeepSeek-V3 needs 671 billion parameters; its latent is 576 values per token per layer.
Hello, world! How are you today? I'm fine, thanks. Don't forget: 1234567890 and 3.14159.
def forward(self, x):\n    return self.norm(x + self.attn(x))  # residual\n
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name;
深度求索发布了新的模型。我们在每个层为每个词元缓存一个压缩的潜在向量。你好，世界！
今日は良い天気ですね。カタカナとひらがなを混ぜて書きます。東京へ行きます。
안녕하세요, 세계! 한국어 문장도 조금 넣습니다.
Привет, мир! Это русский текст для обучения. Γειά σου κόσμε. مرحبا بالعالم. שלום עולם.
Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ and symbols ©®™ € £ ¥ → ← ≤ ≥ ∑ ∫ √.
Numbers 2024-12-06, 12:30:45, 1,000,000, 0.000123, 1e-5, 0x7fff, #42, 100%.
Tabs\tand  double  spaces   and newlines\n\nand\r\nwindows line ends.
"""


def make_tokenizer(splits, special, vocab_size, corpus):
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[BOS, EOS] + special)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)])
    return tok


def test_strings(special):
    s = [
        "", "Hello", "Hello, world!", " leading space", "trailing space ", "  two leading",
        "Hello world how are you", "The quick brown fox jumps over the lazy dog.",
        "don't can't I'm we'll", "MixedCASE wOrDs ALLCAPS", "snake_case camelCase kebab-case",
        "1", "12", "123", "1234", "1234567890", "3.14159", "2024-12-06 12:30:45", "1,000,000",
        "0x7fff 1e-5 -42 +7", "v1.2.3-rc4", "#42 @user $100 50% a&b",
        "深度求索", "你好，世界！", "我们在每个层为每个词元缓存一个压缩的潜在向量。",
        "今日は良い天気ですね。", "カタカナ ひらがな 漢字", "안녕하세요 세계", "Привет, мир!",
        "Γειά σου κόσμε", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ", "ไทย ภาษา",
        "Ünïcödé ñ ç ø å ß ﬁ", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３", "e\u0301 (combining acute)",
        "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "I ❤️ 🦀 and 🐍!", "∑∫√≤≥→←", "©®™€£¥",
        "\t", "\n", "\r\n", "a\tb", "a\nb", "a\r\nb", "line1\n\nline3", "   ", "a    b",
        "trailing newline\n", "\n\nleading newlines", " \n \n ", "tab\tseparated\tvalues",
        "def f(x):\n    return x * 2  # double\n", "if (a && b || !c) { return; }",
        "x = [1, 2, 3]; y = {'k': \"v\"}", "SELECT * FROM t WHERE a >= 18;",
        "https://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Windows\\path",
        "<html><body>Hi</body></html>", "```python\nprint('hi')\n```",
        "...!!!???", "—–-", "“quoted” ‘single’ «guillemets»", "a.b,c;d:e",
        "zero\u200bwidth", "nb\u00a0sp", "\u3000ideographic space", "ZWJ\u200dhere",
        "<unk>", "<s> </s>", "<|endoftext|>", "<｜not▁a▁token｜>",
    ]
    s += [BOS + "Hello", "Hi" + EOS, BOS + "a" + EOS, f"x {BOS} y", f"{EOS}{EOS}", BOS]
    s += [t + " text " + t for t in special[:3]]
    s.append("The quick brown fox. " * 40)
    s.append("数字123和字母abc混合456！" * 5)
    # Random mixtures of everything above (a fixed seed): where the regexes' edges meet.
    rng = random.Random(1234)
    pool = (list("abcXYZ019 .,!?'\"-_/\\()[]{}<>@#$%^&*+=~`|;:") + [" ", "  ", "\t", "\n", "\r\n"]
            + list("深度求索你好世界。，！今日はカタカナ한국어Привет日本語éüßΩ✓€")
            + ["😀", "👍🏽", "👨‍👩‍👧", "\u200b", "\u00a0", "\u3000", "e\u0301", "1234", "३४"]
            + [BOS, EOS] + special[:2])
    for _ in range(200):
        s.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 30))))
    return s


def cases(tok, strings):
    out = []
    for text in strings:
        plain = tok.encode(text, add_special_tokens=False).ids
        with_special = tok.encode(text, add_special_tokens=True).ids
        out.append({
            "text": text,
            "ids": plain,
            "ids_with_special": with_special,
            "decoded": tok.decode(with_special, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(with_special, skip_special_tokens=True),
        })
    # Ids that are not valid UTF-8 on their own: single byte-level tokens of the bytes 0x80-0xff
    # and a split multi-byte character.
    ids = [tok.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    high = [tok.token_to_id(chr(x)) for x in (0x0122, 0x00a2)]  # 0xA2 and 0x22-ish bytes
    for seq in ([i for i in ids[:8] if i is not None], [h for h in high if h is not None]):
        out.append({"text": None, "ids": seq, "ids_with_special": seq,
                    "decoded": tok.decode(seq, skip_special_tokens=False),
                    "decoded_skip_special": tok.decode(seq, skip_special_tokens=True)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data/tokenizers")
    args = ap.parse_args()
    corpus = [line for line in TRAINING_TEXT.split("\n") if line] * 3
    for name, splits, special, vocab in (("v3", V3_SPLITS, V3_SPECIAL, 1200),
                                          ("v2", V2_SPLITS, V2_SPECIAL, 1000)):
        tok = make_tokenizer(splits, special, vocab, corpus)
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        tok.save(os.path.join(d, "tokenizer.json"))
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS,
                  "eos_token": EOS, "model_max_length": 16384,
                  "tokenizer_class": "LlamaTokenizerFast"}
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        data = {"tokenizers_version": __import__("tokenizers").__version__,
                "vocab_size": tok.get_vocab_size(), "cases": cases(tok, test_strings(special))}
        with open(os.path.join(d, "cases.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
        print(f"{name}: vocab {tok.get_vocab_size()}, {len(data['cases'])} cases -> {d}")


if __name__ == "__main__":
    main()
