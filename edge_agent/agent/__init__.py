"""The agent's composition root: builds every adapter from the config, starts and stops them."""
