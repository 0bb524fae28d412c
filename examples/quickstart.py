"""Compose two tiny random Llama models, train the composition a few steps, and generate.

Runs in seconds on a CPU; swap in any pair of Hugging Face causal LMs that share a tokenizer
(`AutoModelForCausalLM.from_pretrained(...)`) for real work.
"""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import calm


def tiny_llama(width: int, layers: int, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        eos_token_id=2,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config)


anchor = tiny_llama(64, 4, seed=0)  # the model to extend
augment = tiny_llama(32, 8, seed=1)  # the specialist

model = calm.CALM(anchor, augment, calm.CALMConfig())  # every 4th augmenting layer
print("connections:", model.connections)
print("trainable parameters:", model.num_trainable_parameters())

ids = torch.randint(3, 128, (8, 16))
optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
model.train()
for step in range(5):
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")

model.eval()
print(model.generate(ids[:2, :5], max_new_tokens=8))
model.save_pretrained("runs/quickstart")  # composition weights and config only
restored = calm.CALM.from_pretrained("runs/quickstart", anchor, augment)
print("restored equals trained:", torch.equal(restored(ids).logits, model(ids).logits))
