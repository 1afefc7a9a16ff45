"""One sandbox's own room: what was asked (`spec`), the object with one method per verb (`sandbox`),
its captures (`capture`, `image`), its takeover descriptor and where its files live (`layout`)."""
