"""Views of the runtime and of Pool calls: live ipywidgets in a notebook
(``live``), and the plain rows they are drawn from (``view``)."""
