"""Front doors: the ``beit3`` command line (:mod:`app.cli`) and the Streamlit app."""
