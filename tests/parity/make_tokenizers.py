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

Each tokenizer_config.json carries a chat template as DeepSeek published it (v3: DeepSeek-V3's,
r1: DeepSeek-R1's, which drops the reasoning before </think> and opens <think> in the generation
prompt, beside v3's tokenizer; v2: DeepSeek-V2-Chat's). chat_cases.json holds what transformers'
apply_chat_template made of a set of conversations (text and ids), and jinja_cases.json what
transformers' template environment renders for small templates that cover the rest of the Jinja
mlaserve implements (runtime/jinja.h).

    pip install tokenizers==0.23.3 transformers==5.17.0 jinja2==3.1.6
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


# The chat templates as published in the checkpoints' tokenizer_config.json (Jinja source).
V3_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + "
    "'\\n\\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{bos_token}}"
    "{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + "
    "'\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] "
    "+ '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}"
    "{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{{'<｜Assistant｜>' + message['content'] + "
    "'<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}"
    "{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + "
    "message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}")
R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}"
    "{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + "
    "'\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] "
    "+ '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}"
    "{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + "
    "message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")
V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def conversations():
    """Conversations every template is applied to (with and without a system message,
    multi-turn, reasoning, tool calls, odd text)."""
    tool_call = {"type": "function", "function": {"name": "get_weather",
                                                  "arguments": "{\"city\": \"Paris\"}"}}
    tool_call2 = {"type": "function", "function": {"name": "get_time",
                                                   "arguments": "{\"tz\": \"CET\"}"}}
    return [
        ("user", [{"role": "user", "content": "Hello!"}]),
        ("system_user", [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "What is MLA?"}]),
        ("multi_turn", [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello! How can I help?"},
                        {"role": "user", "content": "Tell me a joke."}]),
        ("system_multi_turn", [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "1+1?"},
                               {"role": "assistant", "content": "2"},
                               {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"},
                               {"role": "user", "content": "And 3+3?"}]),
        ("two_systems", [{"role": "system", "content": "Rule one."},
                         {"role": "system", "content": "Rule two."},
                         {"role": "user", "content": "Go."}]),
        ("reasoning", [{"role": "user", "content": "Why?"},
                       {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\nBecause."},
                       {"role": "user", "content": "Sure?"}]),
        ("tool_calls", [{"role": "user", "content": "Weather and time in Paris?"},
                        {"role": "assistant", "content": None, "tool_calls": [tool_call, tool_call2]},
                        {"role": "tool", "content": "{\"temp\": 21}"},
                        {"role": "tool", "content": "{\"time\": \"12:00\"}"},
                        {"role": "assistant", "content": "21 degrees at noon."},
                        {"role": "user", "content": "Thanks"}]),
        ("tool_output_last", [{"role": "user", "content": "Weather?"},
                              {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                              {"role": "tool", "content": "sunny"}]),
        ("unicode", [{"role": "system", "content": "用中文回答。"},
                     {"role": "user", "content": "你好，世界！👨‍👩‍👧‍👦 e\u0301 ﬁ\n\tcode:\n    x = 1\n"}]),
        ("special_text", [{"role": "user", "content": "<｜User｜>not a turn<｜end▁of▁sentence｜>"}]),
        ("empty_content", [{"role": "user", "content": ""}]),
        ("whitespace", [{"role": "system", "content": "  spaced  "},
                        {"role": "user", "content": "\n\nlines\n\n"}]),
    ]


def chat_cases(tok_dir):
    # PreTrainedTokenizerFast runs tokenizer.json as it is (AutoTokenizer in transformers 5
    # turns a "LlamaTokenizerFast" class into a Metaspace tokenizer, which DeepSeek's is not).
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    raw = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    out = []
    for name, messages in conversations():
        for gen in (True, False):
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            except Exception as e:  # the template refuses it (V2's with tool calls): so must we
                out.append({"name": name, "messages": messages, "add_generation_prompt": gen,
                            "error": type(e).__name__ + ": " + str(e)})
                continue
            ids = list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                               return_dict=False))
            # The ids are the text encoded without added special tokens.
            assert ids == raw.encode(text, add_special_tokens=False).ids, name
            out.append({"name": name, "messages": messages, "add_generation_prompt": gen,
                        "text": text, "ids": ids})
    return out


def jinja_cases():
    """Small templates over what runtime/jinja.h supports, rendered by transformers' own
    environment (trim_blocks, lstrip_blocks, its tojson)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template
    ctx = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Yo", "extra": None}],
           "d": {"b": 1, "a": [1, 2.5, "x\"y", None, True], "c": {"k": "v"}},
           "s": "  Hello, Wörld!  ", "n": 7, "f": 2.5, "empty": [], "none": None, "t": True}
    templates = [
        "{{ s }}|{{ s|trim }}|{{ s|length }}|{{ s|upper }}|{{ s|lower }}|{{ s.strip() }}",
        "{{ s.split() }}|{{ s.split(',') }}|{{ 'a,b,,c'.split(',', 1) }}|{{ 'a b c'.rsplit(' ', 1) }}",
        "{{ s.lstrip() }}|{{ s.rstrip() }}|{{ 'xxhixx'.strip('x') }}|{{ s.replace('l', 'L') }}",
        "{{ s.startswith('  H') }}{{ s.endswith('x') }}{{ 'abc'.find('c') }}{{ 'aaa'.count('a') }}",
        "{{ 'hello world'.title() }} {{ 'hELLO'.capitalize() }} {{ '-'.join(['a', 'b']) }}",
        "{{ n + 1 }} {{ n - 10 }} {{ n * 2 }} {{ n / 2 }} {{ n // 2 }} {{ n % 3 }} {{ -n % 3 }} {{ n ** 2 }}",
        "{{ f + 1 }} {{ f * 2 }} {{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1.5e-7 }} {{ 3.0 }} {{ -0.5 }} {{ 10 / 4 }}",
        "{{ none }}|{{ t }}|{{ undefined_name }}|{{ [1, 'a', none] }}|{{ {'k': 'v'} }}|{{ (1, 2)|list }}",
        "{{ d|tojson }}|{{ d|tojson(indent=2) }}|{{ messages|tojson }}|{{ 'é\n\\\"'|tojson }}",
        "{{ d.a[1:] }}|{{ d.a[-1] }}|{{ d.a[::-1] }}|{{ s[2:7] }}|{{ s[-3:] }}|{{ 'Wörld'[1] }}",
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}:{{ m.role }}"
        "{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %},{% endfor %}",
        "{% for m in messages if m.role != 'system' %}{{ loop.index0 }}{{ m['content'] }}{% endfor %}",
        "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}",
        "{% for x in empty %}x{% else %}nothing{% endfor %}",
        "{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}"
        "{% endif %}{{ i }}{% endfor %}|{{ range(2, 8, 3)|list }}",
        "{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + i %}{{ x }}{% endfor %}{{ x }}",
        "{% set ns = namespace(total=0) %}{% for i in [1, 2, 3] %}{% set ns.total = ns.total + i %}"
        "{% endfor %}{{ ns.total }}",
        "{% set block %}in {{ n }} block{% endset %}[{{ block }}]",
        "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}"
        "{{ greet('A') }} {{ greet('B', '?') }} {{ greet(name='C') }}",
        "{{ 'yes' if t else 'no' }} {{ 'yes' if none else 'no' }} {{ none or 'fallback' }} "
        "{{ t and 'both' }} {{ not t }} {{ 1 < 2 < 3 if false else 'x' }}",
        "{{ none is none }} {{ n is number }} {{ s is string }} {{ d is mapping }} {{ empty is iterable }}"
        " {{ undefined_name is defined }} {{ n is odd }} {{ n is divisibleby 7 }} {{ 'a' is in 'abc' }}",
        "{{ 'ab' in 'cabd' }} {{ 2 in [1, 2] }} {{ 'a' in d }} {{ 'z' not in d }} {{ [1] == [1] }}"
        " {{ 1 == 1.0 }} {{ 'a' < 'b' }} {{ 'x' ~ 1 ~ none ~ t }}",
        "{{ messages|selectattr('role', 'equalto', 'user')|list|length }}"
        "{{ messages|rejectattr('role', 'eq', 'user')|map(attribute='role')|join(',') }}",
        "{{ empty|first }}|{{ d.a|first }}|{{ d.a|last }}|{{ d.a|reverse|list }}|{{ 'abc'|reverse }}"
        "|{{ missing|default('dflt') }}|{{ ''|default('dflt', true) }}|{{ '42'|int + 1 }}|{{ n|float }}",
        "{{ d.c.k }}{{ d['c']['k'] }}{{ d.get('zz', 'dz') }}{{ d.get('b') }}{{ d.keys()|list }}",
        "{{ messages[2].extra is none }}{{ messages[2].missing is defined }}{{ messages[0]['nope'] }}",
        "a\n  {% if t %}\n  x\n  {% endif %}\nb\n",
        "  {%- if t -%}  tight  {%- endif -%}  |{{- ' spaced ' -}}|  {{ n }}  {# comment #}\n end",
        "{% if t %}\nline\n{% endif %}\n{% for i in [1,2] %}\n  - {{ i }}\n{% endfor %}\n",
        "{%+ if t %}keep{% endif +%}\n   {#- c -#}   x",
        "{% if n > 5 %}big{% elif n > 2 %}mid{% else %}small{% endif %}"
        "{% if n > 50 %}big{% elif n > 5 %}mid{% else %}small{% endif %}",
        "{{ 'it''s' }} {{ \"dq 'sq'\" }} {{ 'tab\\there' }} {{ '\\u00e9\\x41' }}",
        "{% generation %}gen{{ n }}{% endgeneration %}",
        "{{ raise_exception('Only user and assistant roles are supported!') }}",
        "{{ undefined_name.attr }}",
        "{{ 'a' + 1 }}",
        "{{ messages[0]['content'] + messages[1]['content'] }}",
    ]
    out = []
    for t in templates:
        try:
            out.append({"template": t, "output": _compile_jinja_template(t).render(**ctx)})
        except Exception as e:  # what raised is enough: mlaserve must refuse the same ones
            out.append({"template": t, "error": type(e).__name__ + ": " + str(e)})
    return {"context": ctx, "cases": out}


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
    ids = [tok.token_to_id(c) for c in sorted(pre_tokenizers.ByteLevel.alphabet())]
    high = [tok.token_to_id(chr(x)) for x in (0x0122, 0x00a2)]  # 0xA2 and 0x22-ish bytes
    for seq in ([i for i in ids[:8] if i is not None], [h for h in high if h is not None]):
        out.append({"text": None, "ids": seq, "ids_with_special": seq,
                    "decoded": tok.decode(seq, skip_special_tokens=False),
                    "decoded_skip_special": tok.decode(seq, skip_special_tokens=True)})
    return out


def write_config(d, chat_template):
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS,
              "eos_token": EOS, "model_max_length": 16384,
              "tokenizer_class": "LlamaTokenizerFast", "chat_template": chat_template}
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)


def write_chat_cases(d):
    import transformers
    data = {"transformers_version": transformers.__version__, "cases": chat_cases(d)}
    with open(os.path.join(d, "chat_cases.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    print(f"{d}: {len(data['cases'])} chat cases")


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
        write_config(d, V3_CHAT_TEMPLATE if name == "v3" else V2_CHAT_TEMPLATE)
        if name == "v3":
            # R1: DeepSeek-R1's template beside V3's tokenizer (R1 is V3-shaped).
            r1 = os.path.join(args.out, "r1")
            os.makedirs(r1, exist_ok=True)
            tok.save(os.path.join(r1, "tokenizer.json"))
            write_config(r1, R1_CHAT_TEMPLATE)
            write_chat_cases(r1)
        write_chat_cases(d)
        data = {"tokenizers_version": __import__("tokenizers").__version__,
                "vocab_size": tok.get_vocab_size(), "cases": cases(tok, test_strings(special))}
        with open(os.path.join(d, "cases.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
        print(f"{name}: vocab {tok.get_vocab_size()}, {len(data['cases'])} cases -> {d}")
    import jinja2
    data = {"jinja2_version": jinja2.__version__, **jinja_cases()}
    with open(os.path.join(args.out, "jinja_cases.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    print(f"{len(data['cases'])} jinja cases")


if __name__ == "__main__":
    main()
