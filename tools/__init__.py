"""Developer tooling: the ComfyUI test harness, tiny checkpoint writers, the main job. Not shipped to users' graphs."""
