// QwenPix frontend extension. Renders no user-provided text as HTML (textContent only).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "qwenpix.core",
});
