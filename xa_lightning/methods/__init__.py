"""Method registry: one line per method, name -> "module:LightningModuleClass".

Adding a method touches its folder, its config group option and one line here.
"""

METHODS: dict[str, str] = {
    "a4a": "xa_lightning.methods.a4a.lit_module:A4AModule",
    "sun": "xa_lightning.methods.sun.lit_module:SUNModule",
    "x_adapter": "xa_lightning.methods.x_adapter.lit_module:XAdapterModule",
}
