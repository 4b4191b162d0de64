"""Ant-v5 without the 78 contact-force observations (27-dim obs, as the v3-era benchmarks effectively had)."""
import gymnasium as gym

gym.register("AntNoContact-v5", entry_point="gymnasium.envs.mujoco.ant_v5:AntEnv", max_episode_steps=1000,
             kwargs={"include_cfrc_ext_in_observation": False})
