"""Reinforcement learning from a reward: the maths (core), rollouts, the algorithms (ppo, grpo), the
learner that optimises a rollout batch with any of them, and the stage that puts them on the loop."""
