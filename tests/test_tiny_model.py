"""The tiny checkpoint: real format, small, reproducible, loaded by the real code path."""

from __future__ import annotations

import hashlib
import json

from glm4v_bento.cli import main
from glm4v_bento.tiny import EOS_TOKENS, GLM_OUTPUT_TOKENS, GLM_SPECIAL_TOKENS, build_tiny_model


def _digests(directory):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def test_small_and_in_the_real_file_layout(tiny_model_dir):
    names = {f.name for f in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert "generation_config.json" in names and "processor_config.json" in names
    total = sum(f.stat().st_size for f in tiny_model_dir.iterdir())
    assert total < 2 * 1024 * 1024
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Glm4vForConditionalGeneration"]
    assert config["model_type"] == "glm4v"


def test_build_is_deterministic(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    assert _digests(again) == _digests(tiny_model_dir)


def test_cli_builds_the_same_checkpoint(tiny_model_dir, tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "cli")]) == 0
    assert "written to" in capsys.readouterr().out
    assert _digests(tmp_path / "cli") == _digests(tiny_model_dir)


def test_special_tokens_follow_the_real_layout(loaded_model):
    tokenizer = loaded_model.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(t) for t in GLM_SPECIAL_TOKENS]
    # Consecutive, in the real order, right after the text vocabulary as in the real tokenizer.
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    for token in GLM_SPECIAL_TOKENS + GLM_OUTPUT_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    config = loaded_model.model.config
    endoftext = ids[0]
    # The real checkpoint: <|endoftext|> 151329, image start 151339 ... image 151343, video 151344.
    assert config.image_start_token_id - endoftext == 151339 - 151329
    assert config.image_end_token_id - endoftext == 151340 - 151329
    assert config.video_start_token_id - endoftext == 151341 - 151329
    assert config.video_end_token_id - endoftext == 151342 - 151329
    assert config.image_token_id - endoftext == 151343 - 151329
    assert config.video_token_id - endoftext == 151344 - 151329


def test_generation_config_has_the_real_eos_set(loaded_model):
    tokenizer = loaded_model.tokenizer
    assert loaded_model.eos_token_ids == {tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS}


def test_chat_template_renders_the_real_prompt_format(loaded_model):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A house."},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
    ]
    rendered = loaded_model.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\n<|begin_of_image|><|image|><|end_of_image|>What is this?"
        "<|assistant|>\nA house.<|user|>\nColour?<|assistant|>\n"
    )


def test_loads_through_the_auto_classes(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Glm4vForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert isinstance(model, Glm4vForConditionalGeneration)
    assert type(processor).__name__ == "Glm4vProcessor"
    assert type(processor.image_processor).__name__.startswith("Glm4vImageProcessor")
    assert type(processor.video_processor).__name__ == "Glm4vVideoProcessor"


def test_processor_pixel_budget_is_small(loaded_model):
    from conftest import make_image

    out = loaded_model.processor.image_processor(images=[make_image(1000, 800)], return_tensors="pt")
    tokens = int(out["image_grid_thw"].prod()) // 4
    assert 1 <= tokens <= 16
