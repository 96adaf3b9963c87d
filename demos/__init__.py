"""The Gradio demo, `vlm-efficient demo`: `runner` answers with the base and the wrapped model side by side, `render`
draws the kept tokens and attention and the numbers, `app` is the interface, `cli` the command."""
