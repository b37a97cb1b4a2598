"""Build a tiny, randomly initialised checkpoint in GLM-4.1V-9B-Thinking's exact format.

It exists so that demos and tests run anywhere: no GPU, no model hub. Everything that
the serving code touches has the real shape: the model class and config layout, the
special tokens in the real order (so ``image_token_id`` and friends sit at the same
offsets after the text vocabulary as in the real tokenizer), the chat template, the
image/video processors and the EOS set. Only the sizes are small and the weights random,
so its outputs are random tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

# The real tokenizer's added tokens, in the real order starting at <|endoftext|> (151329).
# The real config's token ids follow from this order: image_start = endoftext + 10, etc.
GLM_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
]
# Output-structure markers of GLM-4.1V-Thinking.
GLM_OUTPUT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>"]

EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# Renders the real GLM-4.1V prompt format:
# [gMASK]<sop><|system|>\n...<|user|>\n<|begin_of_image|><|image|><|end_of_image|>text<|assistant|>\n
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages -%}"
    "<|{{ m.role }}|>{{ '\\n' }}"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- else -%}{%- for part in m.content -%}"
    "{%- if part.type == 'image' -%}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif part.type == 'video' -%}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif part.type == 'text' -%}{{ part.text }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)

# Text a tiny byte-level BPE learns its merges from (fixed, so the vocabulary is reproducible).
_CORPUS = [
    "Describe this image. What is in the picture? The image shows a red square on a white background.",
    "Let me think about the question step by step. The answer is in the box.",
    "A cat sits on a mat next to a dog. The sky is blue and the grass is green.",
    "描述这张图片。图片中有什么?这是一只猫。答案是四十二。",
    "1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } , . : ; ! ?",
]
_BPE_VOCAB_SIZE = 600
SEED = 0


def build_tokenizer():
    """A byte-level BPE tokenizer with every GLM-4.1V special token appended in the real order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": GLM_SPECIAL_TOKENS + GLM_OUTPUT_TOKENS})
    return tokenizer


def build_config(tokenizer):
    from transformers import Glm4vConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GLM_SPECIAL_TOKENS}
    vocab_size = (len(tokenizer) + 63) // 64 * 64  # the real vocab is padded the same way
    return Glm4vConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "pad_token_id": ids["<|endoftext|>"],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "image_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )


def build_processor(tokenizer):
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    # Pixel budgets count the temporal factor 2, as the real ones do. Images land between
    # 28x28 (1 token) and about 112x112 (16 tokens).
    image_processor = Glm4vImageProcessor(size={"shortest_edge": 2 * 28 * 28, "longest_edge": 2 * 112 * 112})
    video_processor = Glm4vVideoProcessor(
        size={"shortest_edge": 2 * 28 * 28, "longest_edge": 8 * 56 * 56},
        max_image_size={"longest_edge": 8 * 56 * 56},
    )
    return Glm4vProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(output_dir: str | Path, seed: int = SEED) -> Path:
    """Write the tiny checkpoint to ``output_dir`` (created if needed) and return its path."""
    import torch
    from transformers import GenerationConfig, Glm4vForConditionalGeneration

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config).eval()
    # Spread the random output layer so greedy choices are clear-cut rather than near-ties.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    (out / "glm4v_bento_tiny.json").write_text(
        json.dumps({"note": "tiny random-weight GLM-4.1V-format checkpoint built by glm4v-bento", "seed": seed}) + "\n"
    )
    return out
