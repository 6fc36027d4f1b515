"""`vap`: submit Video-As-Prompt jobs to the stack and follow them (docs: README "Using it with vap")."""
