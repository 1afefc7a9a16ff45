"""`tartarus template build`: a template from Debian packages or from an OCI image.

An image template is the converted image (see tartarus.images) plus the spec's resources, env and
interpreter; its key is the image's manifest digest and the spec, so a new image digest or a changed
spec makes a new template (and, through its key, a new snapshot).
"""

from __future__ import annotations

from collections.abc import Callable

from tartarus.errors import InvalidArgument
from tartarus.guest.cache import digest
from tartarus.templates.debian import build_debian_template
from tartarus.templates.spec import ImageBase, TemplateSpec
from tartarus.templates.store import Template, register_template

IMAGE_BUILDER_VERSION = "oci-image-v1"


def build_template(spec: TemplateSpec, progress: Callable[[str], None] = print) -> Template:
    if isinstance(spec.base, ImageBase):
        return build_image_template(spec, spec.base, progress)
    return build_debian_template(spec, progress)


def build_image_template(spec: TemplateSpec, base: ImageBase, progress: Callable[[str], None]) -> Template:
    from tartarus import images

    if spec.packages:
        raise InvalidArgument(
            f"template {spec.name!r}: `packages` needs a Debian base; an image template has its image's"
        )
    progress(f"pulling {base.image}")
    build = images.pull(base.image, insecure=base.insecure)
    image = images.to_template(build, spec.name)
    template = Template(
        name=spec.name,
        key=digest([IMAGE_BUILDER_VERSION, build.manifest_digest, build.fstype, spec.model_dump_json()]),
        rootfs=build.rootfs,
        fstype=build.fstype,
        vcpus=spec.resources.vcpus,
        memory_mib=spec.resources.memory_mib,
        env={**image.env, **spec.env},
        workdir=spec.workdir or image.workdir,
        preload=spec.interpreter.preload if spec.interpreter else None,
    )
    return register_template(template)
