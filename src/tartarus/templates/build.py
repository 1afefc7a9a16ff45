"""`tartarus template build`: a template from Debian packages or an OCI image, plus optional build steps.

The base comes first (a cached Debian root filesystem, or the converted image: from a registry, a layout,
or a local image built here by `tartarus.images.local`); if the spec has `steps`,
they run in a build VM on a copy of it and their result is cached as a new root filesystem. A template's
key covers its base's identity, its steps and the whole spec, so changing any of them makes a new
template (and, through the key, a new snapshot).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tartarus.bootfiles.cache import cached, digest
from tartarus.errors import InvalidArgument
from tartarus.templates.built import Template, register_template
from tartarus.templates.debian import build_debian_rootfs
from tartarus.templates.spec import DebianBase, ImageBase, LocalImageBase, TemplateSpec
from tartarus.templates.steps import apply_steps

IMAGE_BUILDER_VERSION = "oci-image-v1"
STEPS_VERSION = "build-vm-steps-v1"


def build_template(spec: TemplateSpec, progress: Callable[[str], None] = print) -> Template:
    if spec.packages and not isinstance(spec.base, DebianBase):
        raise InvalidArgument(
            f"template {spec.name!r}: `packages` needs a Debian base; use `steps` to install into an image"
        )
    if isinstance(spec.base, ImageBase):
        base, identity = _image_base(spec, spec.base, progress)
    elif isinstance(spec.base, LocalImageBase):
        from tartarus.images.local import local_image

        ref = local_image(spec.base.local_image, progress)
        base, identity = _image_base(spec, ImageBase(image=ref), progress)
    else:
        rootfs, rootfs_key = build_debian_rootfs(spec, progress)
        base = Template(name=spec.name, key=rootfs_key, rootfs=rootfs, fstype="ext4")
        identity = [rootfs_key]
    if spec.steps:
        steps_key = digest([STEPS_VERSION, *identity, *spec.steps])
        base = replace(base, env={**base.env, **spec.env}, workdir=spec.workdir or base.workdir)

        def build(out: Path) -> None:
            apply_steps(base, spec.steps, out, progress)

        base = replace(base, rootfs=cached("rootfs", steps_key, build) / "rootfs.img", fstype="ext4")
        identity = [steps_key]
    template = Template(
        name=spec.name,
        key=digest([*identity, spec.model_dump_json(exclude={"backend"})]),
        rootfs=base.rootfs,
        fstype=base.fstype,
        vcpus=spec.resources.vcpus,
        memory_mib=spec.resources.memory_mib,
        env={**base.env, **spec.env},
        workdir=spec.workdir or base.workdir,
        preload=spec.interpreter.preload if spec.interpreter else None,
        start=spec.start.command if spec.start else None,
        ready=spec.start.ready if spec.start else None,
        ready_timeout=spec.start.ready_timeout if spec.start else 300.0,
    )
    return register_template(template)


def _image_base(
    spec: TemplateSpec, base: ImageBase, progress: Callable[[str], None]
) -> tuple[Template, list[str]]:
    from tartarus import images

    progress(f"pulling {base.image}")
    build = images.pull(base.image, insecure=base.insecure)
    return images.to_template(build, spec.name), [IMAGE_BUILDER_VERSION, build.manifest_digest, build.fstype]
