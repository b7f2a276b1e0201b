"""Code that runs inside the guest VM (the agent); standard library only."""
