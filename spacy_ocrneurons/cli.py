"""Command-line interface: ``ocrneurons <command>`` or ``python -m spacy_ocrneurons <command>``.

Each command imports its heavy modules lazily so that ``--help`` stays fast.
"""
import typer

app = typer.Typer(
    name="ocrneurons",
    help="spacy-ocrneurons: robust NER on OCR'd historical documents (data, noise, training, neuron identification, evaluation, archives).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# --- data and noise commands (hipe, noise) --------------------------------------------------

# --- training commands ----------------------------------------------------------------------

# --- identification and evaluation commands -------------------------------------------------

# --- archive commands (annotate) -------------------------------------------------------------
