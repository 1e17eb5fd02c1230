"""One module per RL role: actor, critic, ref, reward (RL algorithms) and rollout (vLLM engines)."""
