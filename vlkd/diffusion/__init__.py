"""Few-step samplers from diffusion teachers: schedules, methods, solvers and export."""
