"""hfpipe's GRPO trainer computes each prompt once: its log-probs, entropies, loss and gradients equal TRL's own
computation over whole rows, on GPT-2 (full fine-tuning) and Llama (LoRA), with prompts of different lengths and
answers of different lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trl import GRPOTrainer

from hfpipe.train import grpo_trainer
from hfpipe.train.grpo_trainer import PrefixSharingGRPOTrainer, shared_prefix_layout


def _trainer(tmp_path: Path, model_dir: Path, lora: bool) -> PrefixSharingGRPOTrainer:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = GRPOConfig(
        output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_completion_length=8,
        report_to="none", use_cpu=True, bf16=False,
    )  # fmt: skip
    rows = Dataset.from_list([{"prompt": "the cat sat on"}, {"prompt": "a dog"}])
    reward = lambda completions, **kwargs: [float(len(text)) for text in completions]  # noqa: E731
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    trainer = PrefixSharingGRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=peft
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, read by compute_loss
    return trainer


@pytest.fixture(scope="module")
def tiny_llama_for_grpo(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llama-grpo")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["gpt2-full", "llama-lora"])
def test_the_shared_prefix_pass_equals_trls_logps_loss_and_gradients(
    kind: str, tmp_path: Path, tiny_gpt2_dir: Path, tiny_llama_for_grpo: Path, monkeypatch
) -> None:
    lora = kind == "llama-lora"
    trainer = _trainer(tmp_path, tiny_llama_for_grpo if lora else tiny_gpt2_dir, lora)
    rows = trainer.train_dataset
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([rows[0]] * 4 + [rows[1]] * 4)
    assert inputs["prompt_mask"][4:].sum() < inputs["prompt_mask"][:4].sum()  # the shorter prompt is left-padded
    inputs["completion_mask"][1, 3:] = 0  # answers of different lengths
    inputs["completion_mask"][6, 5:] = 0
    inputs["advantages"] = torch.linspace(-1.0, 1.0, 8)

    passes = []
    original = grpo_trainer.shared_prefix_logps
    monkeypatch.setattr(grpo_trainer, "shared_prefix_logps", lambda *a, **k: passes.append(1) or original(*a, **k))

    def loss_and_gradients(method) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        trainer.model.zero_grad()
        monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", method.__get__(trainer))
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        width = inputs["completion_ids"].shape[1]
        # chunks of 4 rows: one prompt each
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, width, batch_size=4, compute_entropy=True
        )
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        return loss.detach(), torch.stack([logps, entropies]).detach() * mask[:, -width:], grads

    trl_loss, trl_scores, trl_grads = loss_and_gradients(GRPOTrainer._get_per_token_logps_and_entropies)
    assert not passes
    loss, scores, grads = loss_and_gradients(PrefixSharingGRPOTrainer._get_per_token_logps_and_entropies)
    assert len(passes) == 3  # the scores above (two chunks), and the loss

    assert torch.allclose(scores, trl_scores, atol=1e-5)
    assert torch.allclose(loss, trl_loss, atol=1e-6)
    assert grads.keys() == trl_grads.keys() and (not lora or all("lora_" in name for name in grads))
    for name, grad in grads.items():
        assert torch.allclose(grad, trl_grads[name], atol=1e-5), name
    assert any(grad.abs().sum() > 0 for grad in grads.values())


def test_rows_that_share_no_prompt_go_through_trls_own_pass() -> None:
    ids = torch.tensor([[0, 5, 6, 1, 2], [7, 8, 9, 3, 4]])
    assert shared_prefix_layout(ids, torch.ones_like(ids), 2) is None
    shared = torch.tensor([[0, 5, 6, 1, 2], [7, 8, 9, 3, 4], [0, 5, 6, 4, 4]])
    layout = shared_prefix_layout(shared, torch.ones_like(shared), 2)
    assert layout.groups.tolist() == [0, 1, 0] and layout.firsts.tolist() == [0, 1]


def test_a_model_the_shared_pass_does_not_fit_falls_back_to_trls_pass(
    tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch
) -> None:
    """A cache that is not plain tensors (sliding windows, ...): the shared pass gives up, TRL's pass answers, and
    the model is not tried again."""
    trainer = _trainer(tmp_path, tiny_gpt2_dir, lora=False)
    rows = trainer.train_dataset
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([rows[0]] * 4 + [rows[1]] * 4)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        expected, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, width)
        monkeypatch.setattr(grpo_trainer, "shared_prefix_logps", lambda *args, **kwargs: None)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, width)
    assert torch.equal(logps, expected)
    assert getattr(trainer.model, grpo_trainer.PREFIX_FLAG) is False
