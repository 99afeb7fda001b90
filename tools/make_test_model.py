#!/usr/bin/env python3
"""Build the tiny Qwen3 test model deterministically and export it with the real export tool.

The model is random (it knows no medicine) but shaped like Qwen3: grouped-query attention with an
explicit head_dim, q/k norms, tied embeddings, a byte-level BPE tokenizer with Qwen's special
tokens, `<think>`/`</think>` as added tokens and a Qwen3-style chat template. That is enough for
tests of every path of the engine (tokenize, template, prefill, KV cache, int4 kernels, stop
tokens) in seconds and without any download.

    python tools/make_test_model.py                # regenerates edged/models/tiny-qwen3-int4
    python tools/make_test_model.py --checkpoint-out DIR   # and keeps the HF checkpoint
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

# No hub access, ever: the checkpoint is built here from nothing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tokenizer training is parallel; one thread keeps merge order independent of the machine.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "edged" / "models" / "tiny-qwen3-int4"
SEED = 20240521
_QWEN3 = {"num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936}
QWEN3_SHAPES: dict[str, dict[str, int]] = {
    # The public Qwen3 config.json files (Qwen/Qwen3-0.6B, -1.7B, -4B), for random-weight
    # checkpoints of the real sizes (tools/bench_engine.py, tools/export_memory.py).
    "qwen3-0.6b": {
        **_QWEN3,
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
    },
    "qwen3-1.7b": {
        **_QWEN3,
        "hidden_size": 2048,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "intermediate_size": 6144,
        "max_position_embeddings": 40960,
    },
    "qwen3-4b": {
        **_QWEN3,
        "hidden_size": 2560,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "intermediate_size": 9728,
        "max_position_embeddings": 40960,
    },
}
BPE_VOCAB = 1019
"""Byte-level BPE size; with the five added tokens the tokenizer has exactly 1024 entries."""
VOCAB_MULTIPLE = 64
"""Qwen pads the embedding beyond the tokenizer (151669 tokens, 151936 rows); so do we."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")

# Qwen2/Qwen3's pre-tokenizer split (tokenizer.json of Qwen/Qwen3-0.6B): letters with one leading
# non-letter, single digits, punctuation runs, newlines, whitespace.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A faithful simplification of Qwen3's chat template (Qwen/Qwen3-0.6B tokenizer_config.json):
# same system/user/assistant framing, same stripping of reasoning from assistant turns before the
# last user query, same empty think block for enable_thinking=false; tool calling is left out.
CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(searching=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.searching and message.role == "user" and message.content is string %}
        {%- set ns.searching = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')
                .split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')
                + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Hand-written lines: the vocabulary of the wearable and its users, with the non-ASCII the
# tokenizer must survive (degree sign, micro sign, accents, en dash, emoji, CJK).
CORPUS_LINES = """\
My heart rate has been above 120 bpm for the last twenty minutes while sitting.
Resting heart rate this morning was 58 bpm, lower than usual.
The watch says my SpO2 is 91%. Is that dangerous?
SpO2 dropped to 88% during sleep and came back to 95% after I woke up.
I feel dizzy when I stand up quickly; blood pressure was 96/60 mmHg.
Blood pressure 142/91 mmHg after coffee, should I worry?
Temperature 38.4 °C since last night with chills and a headache.
My temperature is 39.2 °C and I have a stiff neck.
Fever of 37.9 °C after the vaccine, otherwise I feel fine.
Respiratory rate is 24 breaths per minute and I feel short of breath.
I am breathing fast, about 28 breaths a minute, and my lips look blue.
The ECG patch flagged an irregular rhythm, possibly atrial fibrillation.
Heart rate variability fell from 62 ms to 31 ms over three nights.
I took 500 µg of medication this morning as prescribed.
Vitamin B12 dose is 1000 µg per day.
She fainted briefly in the kitchen and is now awake and talking.
He has chest pain radiating to the left arm and is sweating.
Chest tightness on exertion that settles with rest within five minutes.
Mild dizziness after standing, no chest pain, no shortness of breath.
Severe headache, the worst of my life, started suddenly an hour ago.
Numbness in the right arm and slurred speech for ten minutes.
Blood glucose is 3.1 mmol/L and I feel shaky and confused.
Blood glucose 14.8 mmol/L after dinner, I have type 2 diabetes.
I feel weak, nauseous, and my pulse is only 42 bpm.
The oximeter reads 97% but I still feel out of breath climbing stairs.
Sleep tracking shows four awakenings and a resting pulse of 71 bpm.
Step count is down to 900 steps a day since the fall.
After the fall my wrist is swollen but I can move my fingers.
My ankle is swollen and warm after a long flight.
Calf pain and swelling on one side only, started two days ago.
Is a heart rate of 105 bpm normal after climbing two flights of stairs?
What should I do if my SpO2 stays below 92% at rest?
When should I call emergency services for chest pain?
How much water should I drink when I have a fever?
Can dehydration make me dizzy and raise my heart rate?
Paracetamol can lower a fever; follow the dose on the package.
Sit or lie down if you feel faint, and stand up slowly afterwards.
If symptoms get worse or you are worried, contact a clinician.
Call the emergency number now if you have chest pain with sweating or breathlessness.
This advice does not replace an examination by a doctor.
Your readings are within the usual range for an adult at rest.
A single high reading is less important than a trend over several days.
Measure again in five minutes, sitting still, with the sensor snug on the wrist.
Cold fingers and movement can make the oximeter read falsely low.
Nail polish can interfere with the optical sensor.
The NEWS2 score combines respiration rate, oxygen saturation and blood pressure,
together with pulse, level of consciousness and temperature.
A NEWS2 score of 7 or more needs an urgent clinical response.
New confusion is a red flag even when the other vitals look normal.
Patients with COPD may have a lower target saturation of 88–92%.
Her baseline saturation is 89–91% because of chronic lung disease.
Temperature between 36.1 °C and 38.0 °C scores zero points.
Systolic pressure of 90 mmHg or less scores three points.
Pulse of 131 bpm or more scores three points.
The café was warm and I felt light-headed after standing in the queue.
Renée reports palpitations at night, about twice a week.
José has had a cough and a fever of 38.6 °C for three days.
Chloé measured her blood pressure: 118/76 mmHg, pulse 64 bpm.
The naïve reading ignored the motion artefact.
Feeling much better today 🙂 heart rate back to 66 bpm.
Alarm ❤️ high heart rate detected: 148 bpm at rest.
Low battery 🔋 please charge the sensor to keep monitoring.
心率 每分钟 72 次，血氧 98%。
体温 38.5 °C，头晕，乏力。
请立即就医。胸痛，出汗，呼吸困难。
心率偏快，请休息后再测量。
血压 150/95 mmHg，请咨询医生。
Am I dehydrated? My urine is dark and my heart rate is 112 bpm.
I skipped lunch and now I feel dizzy and my hands are trembling.
I have had diarrhoea since yesterday and feel faint when standing.
Is it safe to exercise with a resting pulse of 95 bpm?
Fever with a rash that does not fade under a glass needs urgent care.
A temperature below 35.0 °C is hypothermia and needs attention.
I am shivering, my temperature is 35.4 °C and I feel drowsy.
Can anxiety cause a fast heart rate and tingling in the hands?
Breathe slowly in through the nose and out through the mouth.
Let me know if the dizziness comes back or gets worse.
Your oxygen saturation is low; sit upright and call for help.
Please check the sensor fit and repeat the measurement.
I cannot give a diagnosis, but these symptoms need a clinician today.
The readings over the last hour: 88, 91, 94, 97, 101, 104 bpm.
Average SpO2 overnight 94%, lowest 86% at 03:12.
Skin temperature rose by 1.3 °C compared with the baseline.
The device recorded 14 minutes of irregular rhythm yesterday.
Pulse 48 bpm during sleep is common in fit adults.
I run marathons and my resting heart rate is 41 bpm.
My grandmother is 84, her pulse is 110 bpm and she seems confused.
My son is 6 and has a temperature of 39.5 °C and is very sleepy.
Pregnant, 32 weeks, headache and swelling of the face and hands.
Blood pressure 168/104 mmHg with blurred vision.
Heavy sweating at night and weight loss over two months.
Cough with green sputum, fever 38.2 °C and breathing rate 22.
Sore throat and a temperature of 37.6 °C for one day.
I twisted my knee; it is painful but I can walk.
Keep the wearable on the wrist, two fingers above the wrist bone.
The gateway sends vitals every five seconds over MQTT.
Sensor disconnected; last heart rate 76 bpm at 14:05.
""".splitlines()

_VITALS = (
    ("heart rate", "bpm", (48, 61, 74, 88, 97, 112, 126, 139)),
    ("pulse", "bpm", (44, 59, 67, 83, 104, 118, 131)),
    ("SpO2", "%", (86, 89, 91, 93, 95, 97, 99)),
    ("respiratory rate", "breaths per minute", (8, 11, 14, 18, 21, 24, 27)),
    ("systolic pressure", "mmHg", (88, 97, 108, 121, 139, 156, 181)),
)
_CONTEXTS = (
    "at rest",
    "after a short walk",
    "during sleep",
    "this morning",
    "while I felt dizzy",
    "with a mild fever",
)
_TEMPERATURES = ("35.6", "36.4", "36.9", "37.3", "37.8", "38.3", "38.9", "39.6", "40.1")
_SYMPTOMS = ("a headache", "chills", "a cough", "muscle aches", "nausea", "no other symptoms")


def corpus() -> list[str]:
    """The training text: the hand-written lines plus reading templates, in a fixed order."""
    lines = [line for line in CORPUS_LINES if line.strip()]
    for i, (vital, unit, values) in enumerate(_VITALS):
        for j, value in enumerate(values):
            context = _CONTEXTS[(i + j) % len(_CONTEXTS)]
            lines.append(f"My {vital} was {value} {unit} {context}.")
            lines.append(f"The wearable reported {vital} {value} {unit}; is that normal {context}?")
    for k, temp in enumerate(_TEMPERATURES):
        lines.append(f"Temperature {temp} °C with {_SYMPTOMS[k % len(_SYMPTOMS)]}.")
    return lines


# GPT-2's split (ByteLevel's own regex) with one change: a decimal number stays one piece
# (" 36.7", where GPT-2 makes " 36", ".", "7").
NUMBERS_SPLIT_REGEX = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+(?:\.\p{N}+)?| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("qwen2", "gpt2", "numbers")
"""The pre-tokenizer splits: `qwen2`, Qwen's (single digits, a space its own token before a
number); `gpt2`, GPT-2's (a number and the space before it one piece); `numbers`, GPT-2's with
decimals kept whole (NUMBERS_SPLIT_REGEX). The first two are llama.cpp's names for them (GGUF
`tokenizer.ggml.pre`); llama.cpp has none for the third."""


def build_tokenizer(
    out_dir: Path,
    lines: list[str] | None = None,
    bpe_vocab: int = BPE_VOCAB,
    exact: bool = True,
    pre: str = "qwen2",
):  # -> PreTrainedTokenizerFast
    """Train the byte-level BPE on `lines` (default: the test corpus) and save it as a
    transformers tokenizer in `out_dir`. `exact`: fail unless the vocabulary reaches
    `bpe_vocab` (the fixture's size is part of its shape); otherwise it is a ceiling (the demo
    model's templated dialogues saturate below it). `pre`: one of PRE_TOKENIZERS."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    if pre in ("qwen2", "numbers"):
        regex = QWEN_SPLIT_REGEX if pre == "qwen2" else NUMBERS_SPLIT_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=False, trim_offsets=False, use_regex=False
                ),
            ]
        )
    elif pre == "gpt2":  # ByteLevel's own regex is GPT-2's
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=False, trim_offsets=False, use_regex=True
        )
    else:
        raise ValueError(f"pre = {pre!r} is not one of {', '.join(PRE_TOKENIZERS)}")
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus() if lines is None else lines, trainer=trainer)
    if exact and tok.get_vocab_size() != bpe_vocab:
        raise RuntimeError(
            f"BPE training gave {tok.get_vocab_size()} tokens, expected {bpe_vocab}: "
            "the corpus is too small for the requested vocabulary"
        )
    # Qwen3 order: BPE first, then the special tokens, then the think tags as plain added tokens.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
        # Like Qwen2TokenizerFast: no token_type_ids, which generate() would reject.
        model_input_names=["input_ids", "attention_mask"],
    )
    hf_tok.save_pretrained(out_dir)
    return hf_tok


# The committed fixture's shape: small enough that the int4 export is a few hundred KB.
TINY_SHAPE: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
}


def build_checkpoint(
    out_dir: Path,
    shape: Mapping[str, int] | None = None,
    sampling_defaults: bool = True,
    dtype: str = "float32",
) -> Path:
    """Write a Qwen3 HF checkpoint with random weights (seeded), the test tokenizer and configs
    into `out_dir`: the tiny fixture by default, or another `shape` (tools/bench_engine.py
    builds Qwen3-0.6B's). `sampling_defaults` writes Qwen3's recommended sampling into
    generation_config.json, as the real model ships; without it `generate` is greedy. `dtype`
    "bfloat16" builds and saves the weights as the public Qwen3 checkpoints are published
    (half the memory and disk of float32)."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    dims = dict(shape or TINY_SHAPE)
    dims.setdefault("vocab_size", -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)

    config = Qwen3Config(
        **dims,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        # At the usual 0.02 a random model repeats one token forever, and a parity test between
        # two runtimes that both print "aaaa" proves nothing.
        initializer_range=0.5,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        dtype=dtype,
    )
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        model = Qwen3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    # Qwen3's recommended sampling for thinking mode; greedy tests override it.
    sampling = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
        **(sampling if sampling_defaults else {}),
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def distinct_greedy_tokens(checkpoint: Path, new_tokens: int = 16) -> int:
    """How many distinct tokens a greedy continuation has: a sanity check on the random init."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = tokenizer("My heart rate is 120 bpm", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return len(set(out[0, ids["input_ids"].shape[1] :].tolist()))


def fixture_options(checkpoint: Path, out: Path, quant: str = "int4", progress: bool = True):
    """The export options of the committed fixture (tests reuse them to check it is current)."""
    from edged.export import ExportOptions

    return ExportOptions(
        source=str(checkpoint),
        output=Path(out),
        quant=quant,
        # The committed fixture and tests/test_export.py are the optimum layout's tests.
        exporter="optimum",
        name=f"tiny-qwen3-{quant}",
        progress=progress,
        overwrite=True,
        # The checkpoint lives in a temp dir; its path would make every manifest differ.
        source_label="tools/make_test_model.py",
    )


MACHINE_DEPENDENT = (
    "top1_agreement_vs_fp32",
    "top1_agreement_vs_transformers",
    "prompts",
    "positions",
)
"""Verification results that depend on the CPU that measured them, not on the files: the int4
graph runs onnxruntime's MatMulNBits kernels, which differ per instruction set (the tiny
fixture agrees with fp32 on 0.3462 of next tokens with AVX-512 VNNI and on 0.3526 on an
AVX2-only CPU, from the same bytes). A committed fixture keeps only what reproduces byte for
byte; the tool prints the rest."""

log = logging.getLogger("make_test_model")


def commit_manifest(out: Path, measured):
    """Rewrite `out`'s manifest without the MACHINE_DEPENDENT results and return `measured`,
    the export's full manifest, for the caller to print."""
    from dataclasses import replace

    from edged.engine.manifest import write_manifest

    dropped = {k: v for k, v in measured.verification.items() if k in MACHINE_DEPENDENT}
    kept = {k: v for k, v in measured.verification.items() if k not in MACHINE_DEPENDENT}
    write_manifest(Path(out), replace(measured, verification=kept))
    if dropped:
        log.info("measured on this CPU, not written to %s: %s", out, json.dumps(dropped))
    return measured


def make(out: Path, quant: str = "int4", checkpoint_out: Path | None = None, progress: bool = True):
    """Build the checkpoint (into `checkpoint_out` or a temp dir), export it into `out` and
    strip the machine-dependent results from its manifest; return the full manifest."""
    from edged.export import export_model

    with tempfile.TemporaryDirectory(prefix="edged-tiny-qwen3-") as tmp:
        checkpoint = Path(checkpoint_out) if checkpoint_out else Path(tmp) / "checkpoint"
        build_checkpoint(checkpoint)
        distinct = distinct_greedy_tokens(checkpoint)
        if distinct < 4:
            raise RuntimeError(
                f"greedy continuation of the tiny model has {distinct} distinct tokens (< 4): "
                "a parity test on it would prove nothing"
            )
        return commit_manifest(out, export_model(fixture_options(checkpoint, out, quant, progress)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="edged model dir to write")
    parser.add_argument("--quant", choices=("int4", "int8", "fp32"), default="int4")
    parser.add_argument(
        "--checkpoint-out", type=Path, default=None, help="keep the HF checkpoint in this dir"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = make(args.out, args.quant, args.checkpoint_out, progress=not args.no_progress)
    print(json.dumps(manifest.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
