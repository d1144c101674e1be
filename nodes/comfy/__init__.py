"""Everything that touches ComfyUI internals, one job per module; the node modules
only declare their inputs and call these. Written against ComfyUI 0.3.64 and current
releases (0.33): where they differ, a module detects the feature, never a version.

- folders:       the model folders we read and write (calib_states registered here)
- weights:       model access: the Wan root, its Linear ops, real-valued weights from any
                 stored form, the effective weight (LoRA merged), the plan for a MODEL
- w4a4:          the Apply node's W4A4: weight patch, forward patch, sampling wrappers
- packed_ops:    the Linear ops that load and run packed HiF4 layers
- packed_loader: a MODEL from a packed checkpoint, and its PREPARE_SAMPLING guard
- packed_lora:   LoRAs on packed layers (bypass terms, or merge through core's
                 convert_weight / set_weight)
- export:        a MODEL as hifloat4.export's source (Save HiF4 Model)
- calibration:   observers and ComfyUI's sampler for the Calibrate node
- patch_record:  a MODEL's weight patches (LoRAs) as a PTQ state records them
- lora_graph:    the LoRA file names upstream of a node in the queued prompt (pure)
- progress:      progress bar, cancel, and messages shown on the node

Modules are shared between clones, so nothing here sets attributes on modules, except
the LoRA route of each packed layer, which the guard sets every time sampling is
prepared (as ComfyUI patches shared weights for the clone it loads); each module is
imported only inside ComfyUI (nodes/__init__.py checks for it).
"""
