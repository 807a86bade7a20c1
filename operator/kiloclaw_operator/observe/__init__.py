"""Where observed Fly state comes from (DESIGN 3.2): the seam (``protocol``), per-instance polling
(``polling``), the organisation feed (``feed``), and which one a run uses (``wiring``)."""
