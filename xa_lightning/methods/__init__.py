"""Method registry: one line per method, name -> "module:LightningModuleClass".

Adding a method touches its folder, its config group option and one line here.
"""

METHODS: dict[str, str] = {
}
