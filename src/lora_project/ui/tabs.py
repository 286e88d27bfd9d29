"""The workbench's five tabs, one function each; `app.build_app` assembles them into one page.

Each tab function is called inside the page's `gr.Blocks`: it lays out its components, wires
their events, and returns what it needs when the page loads (a function of the app that
registers its `app.load` events, called after every tab is laid out) or None. Handlers turn a
UserError into a message on the page (beside the field it concerns where there is one);
anything else is a bug and Gradio shows it as an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.ui import actions, render, state
from lora_project.ui.jobs import TrainingJobs

CATALOG_COLUMNS = [("name", "dataset"), ("kind", "kind"), ("enabled", "enabled"), ("source", "source"),
                   ("prepared", "prepared"), ("train_docs", "train docs"), ("train_tokens", "train tokens"),
                   ("validation_tokens", "validation tokens"), ("test_tokens", "test tokens")]
RUN_COLUMNS = [("experiment", "experiment"), ("status", "status"), ("dataset", "dataset"), ("steps", "steps"),
               ("val ppl after", "val ppl after"), ("mlflow_run_id", "MLflow run")]
ADAPTER_COLUMNS = [("name", "adapter"), ("status", "status"), ("dataset", "dataset"), ("r", "r"),
                   ("alpha", "alpha"), ("target_modules", "targets"), ("perplexity_after", "val ppl"),
                   ("created", "created"), ("mlflow_run_id", "MLflow run"), ("reason", "reason")]

OnLoad = Callable[[object], None]  # registers a tab's `app.load` events on the assembled app


@dataclass
class Page:
    """What every tab works on: the project, its training processes, the shared base model cache
    and the MLflow tracking URI."""

    paths: ProjectPaths
    jobs: TrainingJobs
    cache: actions.BaseCache
    uri: str

    def dataset_names(self) -> list[str]:
        try:
            return [r["name"] for r in state.catalog_rows(self.paths)]
        except UserError:
            return []


def _err(exc: Exception) -> str:
    return f"**error:** {' '.join(str(exc).split())}"


def _image(path: str):
    """A PNG the inspection wrote under outputs/, read here (Gradio then serves its own copy)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


def catalog_tab(page: Page) -> OnLoad:
    """The catalog table, a dataset's sample, and the Prepare button."""
    import gradio as gr

    paths = page.paths
    with gr.Tab("Catalog", id="catalog", elem_id="tab-catalog") as tab_catalog:
        catalog_html = gr.HTML(elem_id="catalog-box")
        with gr.Row():
            cat_name = gr.Dropdown(label="dataset", choices=[], elem_id="cat-name", interactive=True)
            prep_btn = gr.Button("Prepare", elem_id="prepare-btn", variant="primary")
        cat_msg = gr.Markdown(elem_id="cat-msg")
        cat_sample = gr.Textbox(label="sample of the training split", lines=8, interactive=False,
                                elem_id="cat-sample")

    def load_catalog():
        try:
            rows = state.catalog_rows(paths)
        except UserError as exc:
            return f"<p>{_err(exc)}</p>", gr.update(choices=[])
        names = [r["name"] for r in rows]
        html = render.table(rows, CATALOG_COLUMNS, table_id="catalog-table", empty="the catalog is empty")
        return html, gr.update(choices=names)

    def show_sample(name):
        if not name:
            return ""
        try:
            return state.dataset_sample(paths, name)
        except UserError as exc:
            return _err(exc)

    def do_prepare(name):
        try:
            msg = actions.prepare(paths, name)
        except UserError as exc:
            msg = _err(exc)
        html, _ = load_catalog()
        return msg, html, show_sample(name)

    tab_catalog.select(load_catalog, outputs=[catalog_html, cat_name])
    cat_name.change(show_sample, inputs=cat_name, outputs=cat_sample)
    prep_btn.click(do_prepare, inputs=cat_name, outputs=[cat_msg, catalog_html, cat_sample])
    return lambda app: app.load(load_catalog, outputs=[catalog_html, cat_name])


def train_tab(page: Page) -> OnLoad:
    """The training form (errors beside each field, the equivalent command line), Start and Stop,
    and the followed training's progress, loss curve, process output and the runs table."""
    tab = _TrainTab(page)
    tab.lay_out()
    tab.wire()
    return tab.on_load


class _TrainTab:
    """The Train tab's components (`lay_out`), handlers (the methods Gradio calls) and events (`wire`)."""

    def __init__(self, page: Page):
        self.page, self.paths = page, page.paths

    def lay_out(self) -> None:
        import gradio as gr

        with gr.Tab("Train", id="train", elem_id="tab-train") as self.tab:
            gr.Markdown(state.mlflow_hint(self.page.uri), elem_id="mlflow-hint")
            with gr.Row():
                with gr.Column():
                    self.dataset = gr.Dropdown(label="dataset", choices=self.page.dataset_names(), elem_id="t-dataset")
                    e_dataset = gr.Markdown(elem_classes="lp-err", elem_id="err-dataset")
                with gr.Column():
                    self.adapter = gr.Textbox(label="adapter name (default: the dataset's)", elem_id="t-adapter")
                    e_adapter = gr.Markdown(elem_classes="lp-err", elem_id="err-adapter")
                with gr.Column():
                    overwrite = gr.Checkbox(label="overwrite an existing adapter", elem_id="t-overwrite")
                    mlflow = gr.Checkbox(label="track in MLflow", value=True, elem_id="t-mlflow")
            self.fields, errors = [], []
            with gr.Row():
                for key, label in state.TRAIN_FIELDS:
                    with gr.Column(min_width=120):
                        eid = key.replace(".", "-").replace("_", "-")
                        if key == "training.precision":
                            self.fields.append(gr.Dropdown(label=label, choices=["auto", "fp32", "bf16"],
                                                           elem_id=f"f-{eid}", allow_custom_value=True))
                        else:
                            self.fields.append(gr.Textbox(label=label, elem_id=f"f-{eid}", max_lines=1))
                        errors.append(gr.Markdown(elem_classes="lp-err", elem_id=f"err-{eid}"))
            self.e_general = gr.Markdown(elem_classes="lp-err", elem_id="err-general")
            cmd = gr.Textbox(label="the same run from a terminal", interactive=False, elem_id="train-cmd")
            with gr.Row():
                self.start_btn = gr.Button("Start", variant="primary", elem_id="start-btn")
                self.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
            self.msg = gr.Markdown(elem_id="train-msg")
            progress = gr.Markdown(elem_id="train-progress")
            plot = gr.LinePlot(x="step", y="loss", color="series", title="loss (nats/token)",
                               elem_id="loss-plot", height=300)
            log = gr.Textbox(label="output of the training process", lines=6, max_lines=6, interactive=False,
                             elem_id="train-log", autoscroll=True)
            runs_html = gr.HTML(elem_id="runs-box")
            self.timer = gr.Timer(1.0)
            shown = gr.State(None)  # what this page last drew (per browser tab)
        self.form_inputs = [self.dataset, self.adapter, overwrite, mlflow, *self.fields]
        self.form_outputs = [cmd, e_dataset, e_adapter, *errors, self.e_general]
        self.tick_io = dict(inputs=[self.dataset, self.adapter, shown],
                            outputs=[progress, plot, log, runs_html, shown])

    def preview(self, dataset, adapter, overwrite, mlflow, *values):
        """Command line and errors beside each field, recomputed on every edit."""
        try:
            argv, _, _ = state.check_form(self.paths, dataset, adapter,
                                          dict(zip([k for k, _ in state.TRAIN_FIELDS], values)), overwrite, mlflow)
            errs, cmd = {}, state.command_line(argv)
        except state.FormErrors as exc:
            errs, cmd = exc.errors, "(fix the fields marked in red)"
        except UserError as exc:
            errs, cmd = {"": str(exc)}, ""
        return [cmd, errs.get("dataset", ""), errs.get("adapter", ""),
                *[errs.get(k, "") for k, _ in state.TRAIN_FIELDS], errs.get("", "")]

    def load_form(self):
        import gradio as gr

        try:
            defaults = state.form_defaults(self.paths)
        except UserError as exc:
            return [gr.update()] * len(self.fields) + [_err(exc)]
        return [defaults[k] for k, _ in state.TRAIN_FIELDS] + [""]

    def start(self, dataset, adapter, overwrite, mlflow, *values):
        out = self.preview(dataset, adapter, overwrite, mlflow, *values)
        try:
            argv, _, name = state.check_form(self.paths, dataset, adapter,
                                             dict(zip([k for k, _ in state.TRAIN_FIELDS], values)), overwrite,
                                             mlflow)
            pid = self.page.jobs.start(name, argv)
            msg = f"started `{state.command_line(argv)}` (pid {pid})"
        except UserError as exc:
            msg = _err(exc)
        return [*out, msg]

    @staticmethod
    def followed(dataset, adapter):
        """The adapter the form names (its adapter name, else its dataset), if it is a valid name."""
        name = (adapter or "").strip() or (dataset or "")
        try:
            return state.check_name(name, "adapter name")
        except UserError:
            return None

    def stop(self, dataset, adapter):
        views = state.live_views(self.paths, self.followed(dataset, adapter))
        if not views or views[0]["status"] not in ("RUNNING", "STARTING"):
            return "no training of this adapter is running"
        try:
            return self.page.jobs.stop(views[0]["adapter"])
        except UserError as exc:
            return _err(exc) + f" (pid {views[0]['pid']}: stop it where it was started)"

    def tick(self, dataset, adapter, shown):
        """Progress, loss curve, process output and runs; the curve (and the others) only when they
        changed since this page last drew them (`shown`), so the plot is not redrawn every second."""
        import gradio as gr
        import pandas as pd

        uri = self.page.uri
        views = state.live_views(self.paths, self.followed(dataset, adapter))
        view = views[0] if views else None
        pts = view["curve"] if view else []
        link = ""
        if view and view.get("mlflow_run_id"):
            text, href = state.mlflow_link(uri, view["mlflow_run_id"])
            link = f" · MLflow run [{text}]({href})" if href else f" · MLflow run `{text}`"
        others = "".join(f"\n\nalso: {state.progress_line(v)}" for v in views[1:])
        now = {"progress": state.progress_line(view) + link + others,
               "curve": [view["experiment"] if view else None, len(pts), pts[-1] if pts else None],
               "log": self.page.jobs.log_tail(view["adapter"]) if view else "",
               "runs": render.table(state.runs_table(self.paths), RUN_COLUMNS, table_id="runs-table",
                                    empty="no training runs yet", uri=uri)}
        shown = shown or {}
        curve = pd.DataFrame({"step": pd.Series([p["step"] for p in pts], dtype="int64"),
                              "loss": pd.Series([p["loss"] for p in pts], dtype="float64"),
                              "series": pd.Series([p["series"] for p in pts], dtype="str")})  # typed when empty
        return (*[now[k] if now[k] != shown.get(k) else gr.skip() for k in ("progress",)],
                curve if now["curve"] != shown.get("curve") else gr.skip(),
                *[now[k] if now[k] != shown.get(k) else gr.skip() for k in ("log", "runs")], now)

    def wire(self) -> None:
        import gradio as gr

        form_inputs, form_outputs = self.form_inputs, self.form_outputs
        for comp in form_inputs:  # "always_last": Gradio's default for .input drops keystrokes typed
            # while a preview is pending, so the command line could show "max_steps=4" for a typed 4000
            comp.input(self.preview, inputs=form_inputs, outputs=form_outputs, show_progress="hidden",
                       trigger_mode="always_last")
        self.dataset.change(self.preview, inputs=form_inputs, outputs=form_outputs, show_progress="hidden")
        self.start_btn.click(self.start, inputs=form_inputs, outputs=[*form_outputs, self.msg])
        self.stop_btn.click(self.stop, inputs=[self.dataset, self.adapter], outputs=self.msg)
        self.timer.tick(self.tick, **self.tick_io, show_progress="hidden")
        self.tab.select(lambda: gr.update(choices=self.page.dataset_names()), outputs=self.dataset)

    def on_load(self, app) -> None:
        app.load(self.load_form, outputs=[*self.fields, self.e_general]).then(
            self.preview, inputs=self.form_inputs, outputs=self.form_outputs, show_progress="hidden")
        app.load(self.tick, **self.tick_io)


def compare_tab(page: Page) -> None:
    """Generations of the base model and chosen adapters side by side, greedy or seeded sampling."""
    import gradio as gr

    with gr.Tab("Compare", id="compare", elem_id="tab-compare") as tab_compare:
        c_adapters = gr.CheckboxGroup(label="adapters", choices=[], elem_id="cmp-adapters")
        c_prompt = gr.Textbox(label="prompt", value="the dog", elem_id="cmp-prompt")
        with gr.Row():
            c_tokens = gr.Number(label="max new tokens", value=24, precision=0, elem_id="cmp-tokens")
            c_mode = gr.Radio(["greedy", "seeded sampling"], value="greedy", label="decoding",
                              elem_id="cmp-mode")
            c_temp = gr.Number(label="temperature (sampling)", value=0.8, elem_id="cmp-temp")
            c_seed = gr.Number(label="seed (sampling)", value=0, precision=0, elem_id="cmp-seed")
        gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-btn")
        c_msg = gr.Markdown(elem_id="cmp-msg")
        c_out = gr.HTML(elem_id="cmp-out")

    def adapters_choices():
        try:
            return gr.update(choices=actions.sound_adapters(page.paths))
        except UserError:
            return gr.update(choices=[])

    def do_generate(prompt, adapters, tokens, mode, temp, seed):
        try:
            if not page.cache.loaded:
                yield "loading the base model (first use) ...", ""
            for outputs in actions.generate(page.paths, page.cache, prompt, adapters, max_new_tokens=tokens or 0,
                                            sampling=mode != "greedy", temperature=temp or 0, seed=seed or 0):
                done = sum(v is not None for v in outputs.values())
                yield f"{done} of {len(outputs)} models done", render.side_by_side(prompt.strip(), outputs)
        except UserError as exc:
            yield _err(exc), ""

    tab_compare.select(adapters_choices, outputs=c_adapters)
    gen_btn.click(do_generate, inputs=[c_prompt, c_adapters, c_tokens, c_mode, c_temp, c_seed],
                  outputs=[c_msg, c_out])


def evaluate_tab(page: Page) -> None:
    """The newest saved adapters x datasets matrix (or a sampled one run here) and minimal-pair results."""
    import gradio as gr

    paths = page.paths
    with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate") as tab_eval:
        ev_matrix_msg = gr.Markdown(elem_id="ev-matrix-msg")
        ev_plot = gr.Plot(label="adapters x datasets", elem_id="ev-plot")
        ev_matrix = gr.HTML(elem_id="ev-matrix")
        with gr.Row():
            ev_tokens = gr.Number(label="tokens per dataset", value=400, precision=0, elem_id="ev-tokens")
            ev_btn = gr.Button("Run a sampled evaluation", elem_id="ev-btn")
        gr.Markdown("### Minimal pairs (newest `lora-project evaluate --pairs` result)")
        ev_pairs = gr.HTML(elem_id="ev-pairs")

    def load_eval():
        from lora_project.benchmark.matrix import matrix_figure

        m = state.saved_matrix(paths)
        p = state.saved_pairs(paths)
        pairs = (f"<p>{p['source']}</p>" + render.pairs_table(p)) if p else \
            "<p>no minimal-pair results yet: run <code>lora-project evaluate --pairs DIR --adapter ...</code></p>"
        if not m:
            return ("no saved matrix yet: press *Run a sampled evaluation* (or `lora-project benchmark --matrix`)",
                    None, "", pairs)
        return (f"from `outputs/metrics/{m['source']}` ({m['split']} splits, up to {m['max_tokens']} tokens each)",
                matrix_figure(m), render.matrix_table(m), pairs)

    def run_eval(max_tokens):
        try:
            actions.sampled_matrix(paths, page.cache, int(max_tokens or 0), log=lambda m: None)
        except UserError as exc:
            return _err(exc), gr.update(), gr.update(), gr.update()
        return load_eval()

    tab_eval.select(load_eval, outputs=[ev_matrix_msg, ev_plot, ev_matrix, ev_pairs])
    ev_btn.click(run_eval, inputs=ev_tokens, outputs=[ev_matrix_msg, ev_plot, ev_matrix, ev_pairs])


def inspect_tab(page: Page) -> None:
    """The adapters table, one adapter's weight heatmap and spectra, and two adapters' subspace similarity."""
    import gradio as gr

    paths = page.paths
    with gr.Tab("Inspect", id="inspect", elem_id="tab-inspect") as tab_inspect:
        in_table = gr.HTML(elem_id="inspect-box")
        with gr.Row():
            in_one = gr.Dropdown(label="adapter", choices=[], elem_id="in-one")
            in_btn = gr.Button("Weights: heatmap and spectra", elem_id="in-btn")
        in_msg = gr.Markdown(elem_id="in-msg")
        with gr.Row():
            in_heat = gr.Image(label="relative update per layer and module", elem_id="in-heat", type="pil")
            in_spec = gr.Image(label="singular values", elem_id="in-spec", type="pil")
        with gr.Row():
            in_a = gr.Dropdown(label="adapter A", choices=[], elem_id="in-a")
            in_b = gr.Dropdown(label="adapter B", choices=[], elem_id="in-b")
            cmp_btn = gr.Button("Compare A and B", elem_id="in-cmp-btn")
        in_cmp_msg = gr.Markdown(elem_id="in-cmp-msg")
        in_cmp_img = gr.Image(label="subspace similarity", elem_id="in-cmp-img", type="pil")

    def load_inspect():
        try:
            rows = actions.inspect_rows(paths)
        except UserError as exc:
            return _err(exc), *[gr.update(choices=[])] * 3
        ok = [r["name"] for r in rows if r["status"] == "ok"]
        html = render.table(rows, ADAPTER_COLUMNS, table_id="inspect-table", empty="no adapters yet", uri=page.uri)
        return html, *[gr.update(choices=ok)] * 3

    def show_weights(folder):
        try:
            rep = actions.weights(paths, folder or "")
        except UserError as exc:
            return _err(exc), None, None
        by = ", ".join(f"{k} mean |dW| {v['mean_delta_fro_norm']:.3g}" for k, v in rep["by_module"].items())
        return f"{len(rep['modules'])} modules: {by}", *[_image(p) for p in rep["plots"][:2]]

    def show_compare(a, b):
        try:
            rep = actions.compare(paths, a or "", b or "")
        except UserError as exc:
            return _err(exc), None
        return (f"mean phi(1,1) {rep['mean_phi_top1']:.3f}, mean phi(r,r) {rep['mean_phi_full']:.3f} "
                f"(two random subspaces: ~{rep['random_baseline_full']:.3f})", _image(rep["plots"][0]))

    tab_inspect.select(load_inspect, outputs=[in_table, in_one, in_a, in_b])
    in_btn.click(show_weights, inputs=in_one, outputs=[in_msg, in_heat, in_spec])
    cmp_btn.click(show_compare, inputs=[in_a, in_b], outputs=[in_cmp_msg, in_cmp_img])
