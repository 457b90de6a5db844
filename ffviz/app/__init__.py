"""The app's side of ffviz: a user's run session (``session``), the policy
parameter boxes (``params``), which run a result came from (``provenance``), the
compression steps kept for replay (``cache_history``), quality over time
(``quality``), the three-policy memory test (``memory_test``) and the views
assembled from a session (``views``). No gradio here: app.py at the repository
root lays out the page and wires these plain functions to its widgets, so all of
this is tested without a browser. ``ffviz.viz`` only draws."""
