"""LoRA: low-rank adapters read from and written to the files the Stable Diffusion ecosystem exchanges
(kohya/AUTOMATIC1111 and diffusers/PEFT layouts), merged into a model's weights, or trained with peft."""
