"""RLHF on Ray: worker groups per role (actor, critic, ref, reward, rollout), PPO/GRPO/RLOO controller, DPO."""
