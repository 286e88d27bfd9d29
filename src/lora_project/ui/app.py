"""The Gradio page: five tabs (ui/tabs.py, one function each) over state.py (files), actions.py
(computations) and jobs.py (trainings). `build_app` only assembles the tabs.
"""

from __future__ import annotations

from lora_project.paths import ProjectPaths
from lora_project.ui import actions, state, tabs
from lora_project.ui.jobs import TrainingJobs


def theme():
    """The default look with system fonts only: nothing is fetched from a font service."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def build_app(paths: ProjectPaths, jobs: TrainingJobs | None = None):
    """The Blocks app for the project at `paths` (launched by lora_project.ui.serve)."""
    import gradio as gr

    page = tabs.Page(paths, jobs or TrainingJobs(paths), actions.BaseCache(paths), state.tracking_uri(paths))
    with gr.Blocks(title="lora-project workbench", analytics_enabled=False) as app:
        gr.Markdown(f"## lora-project workbench\nProject `{paths.root}`. Models load when a tab needs one.")
        on_load = [tabs.catalog_tab(page), tabs.train_tab(page), tabs.compare_tab(page), tabs.evaluate_tab(page),
                   tabs.inspect_tab(page)]
        for register in on_load:  # after every tab is laid out, in the tabs' order
            if register is not None:
                register(app)
    return app
