# nbgrader reads the nbgrader_config.py of the folder it runs in (there is no --config flag).
# The course's configuration lives in autograde/, beside the instructor tooling.
load_subconfig("autograde/nbgrader_config.py")  # noqa: F821 (injected by traitlets)
