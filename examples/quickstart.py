"""Compose two tiny random Llama models, train the composition a few steps, and generate.

Runs in seconds on a CPU; swap in any pair of Hugging Face causal LMs that share a tokenizer
(`AutoModelForCausalLM.from_pretrained(...)`) for real work.
"""

import torch

import calm
from calm.hf import tiny_llama

# Two random Llamas of 128 tokens (any HF causal LMs sharing a tokenizer work the same way).
anchor = tiny_llama(128, hidden_size=64, layers=4, seed=0)  # the model to extend
augment = tiny_llama(128, hidden_size=32, layers=8, seed=1)  # the specialist

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
