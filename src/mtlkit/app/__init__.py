"""The application layer: typed configs and their validation, the run builder, ``compare``
grids, plots, the 2-D toy and the command line."""
