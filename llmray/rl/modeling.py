"""Forward passes shared by the actor, ref and critic roles: response log-probs, entropy, values."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from llmray.rl.batch import RLBatch


def response_logits(model, batch: "RLBatch") -> "torch.Tensor":
    """(B, T, V) logits that predict each response token (position P-1+t predicts token t)."""
    P = batch.prompt_ids.size(1)
    T = batch.response_ids.size(1)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False)
    return out.logits[:, P - 1:P - 1 + T]


def response_logprobs(model, batch: "RLBatch", with_entropy: bool = False, temperature: float = 1.0):
    """(B, T) log pi(token) of the response tokens (0 on padding); and (B, T) entropy if asked.

    Logits are divided by the sampling temperature so the numbers are comparable with vLLM's."""
    from llmray.rl.ppo.losses import entropy_from_logits, token_logprobs

    logits = response_logits(model, batch)
    if temperature != 1.0:
        logits = logits / temperature
    mask = batch.response_mask
    lp = token_logprobs(logits, batch.response_ids) * mask
    if not with_entropy:
        return lp
    return lp, entropy_from_logits(logits) * mask




def build_value_model(model_dir: str):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from pathlib import Path

    cfg = AutoConfig.from_pretrained(model_dir)
    body = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    head = torch.nn.Linear(cfg.hidden_size, 1, bias=False)
    torch.nn.init.zeros_(head.weight)  # V = 0 at the start unless a reward head is there
    init_from = "zero head"
    st = Path(model_dir) / "model.safetensors"
    if st.is_file():
        weights = load_file(str(st))
        for key in ("score.weight", "v_head.weight", "value_head.weight"):
            if key in weights and weights[key].shape == head.weight.shape:
                head.weight.data.copy_(weights[key].float())
                init_from = f"reward head ({key})"
                break

    class _Critic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body
            self.head = head
            self.init_from = init_from

        def forward(self, input_ids, attention_mask, position_ids):
            h = self.body(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False).last_hidden_state
            return self.head(h).squeeze(-1)

    return _Critic()


def response_values(critic, batch: "RLBatch") -> "torch.Tensor":
    """(B, T) V(s_t) for the state before each response token is produced (0 on padding)."""
    P = batch.prompt_ids.size(1)
    T = batch.response_ids.size(1)
    v = critic(batch.input_ids, batch.attention_mask, batch.position_ids)
    return v[:, P - 1:P - 1 + T] * batch.response_mask
