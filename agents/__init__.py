"""stable-baselines3 side: PPO, callbacks, the run pipeline and the command line."""
